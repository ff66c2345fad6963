"""Hostile inputs, property-based (hypothesis): odd config values and broken image folders end in a
clear one-line ``UserError`` (the CLI's exit code 2) or work, never in another exception."""

import dataclasses
import io
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dtl_jax import config as C
from dtl_jax.config import DataConfig, TaskConfig
from dtl_jax.data import sources, tasks
from dtl_jax.errors import UserError


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


KEYS = sorted(_keys(C.Config)) + ["nope", "data.nope", "disposal.optim.nope", "data"]
VALUES = st.one_of(
    st.sampled_from(["", "nan", "inf", "-1", "0", "1e309", "true", "abc", "1,2,3", "-5,99", "0.5", "1e-9"]),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_any_override_validates_or_fails_with_one_line(assignments):
    try:
        config = C.validate(C.apply_overrides(C.Config(), [f"{k}={v}" for k, v in assignments]))
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    # What validation lets through is finite and inside its documented range, field by field.
    for key, value in C.fields(config):
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, int | float) and not isinstance(item, bool):
                assert C.rule_for(key).contains(item), (key, item)


def _small(config: C.Config) -> C.Config:
    """The same config with every budget cut to a smoke run's (validity kept): a step or an epoch each."""
    r = dataclasses.replace
    d = config.disposal
    chunks = min(d.num_chunks, 5)  # K HVPs are unrolled: a huge K is valid but compiles for long
    per_chunk = max(1, min(d.source_batch_size // d.num_chunks, 4))
    optim = lambda o: r(o, epochs=min(o.epochs, 1), batch_size=min(o.batch_size, 32))  # noqa: E731
    return r(
        config,
        pretrain=optim(config.pretrain),
        transfer=optim(config.transfer),
        piggyback=r(optim(config.piggyback), shots=tuple(min(s, 3) for s in config.piggyback.shots)[:2], repeats=1),
        disposal=r(
            d,
            steps=min(d.steps, 2),
            eval_every=1,
            num_chunks=chunks,
            source_batch_size=per_chunk * chunks,
            optim=optim(d.optim),
        ),
        model=r(config.model, widths=tuple(min(w, 8) for w in config.model.widths)[:4]),
        data=r(config.data, image_size=min(config.data.image_size, 8)),
        eval=r(config.eval, batch_size=min(config.eval.batch_size, 256)),
        checkpoint_every=0,
        compilation_cache="off",
    )


DTL_KEYS = [k for k in KEYS if not k.startswith("unlearn.")]


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(DTL_KEYS), VALUES), min_size=1, max_size=3))
def test_any_override_fails_with_one_line_or_passes_a_smoke_run(tmp_path_factory, assignments):
    from conftest import tiny_config

    from dtl_jax import dtl

    try:
        config = C.validate(C.apply_overrides(tiny_config(), [f"{k}={v}" for k, v in assignments]))
        config = _small(
            dataclasses.replace(
                config, disposal=dataclasses.replace(config.disposal, methods=config.disposal.methods[:1])
            )
        )
        results = dtl.run(config, tmp_path_factory.mktemp("smoke"), quiet=True)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert set(results["models"]) == {"random_init", "tl", *config.disposal.methods}


def _image_bytes(kind: str, size: int, seed: int) -> bytes:
    if kind == "empty":
        return b""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if kind != "jpeg" else "JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 3] if kind == "truncated" else data


FILE = st.tuples(st.sampled_from(["png", "jpeg", "truncated", "empty"]), st.sampled_from([4, 4, 4, 6]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    train=st.lists(st.lists(FILE, max_size=4), max_size=3),
    test=st.lists(st.lists(FILE, max_size=3), max_size=3),
    classes=st.lists(st.integers(-1, 3), max_size=3),
    image_size=st.sampled_from([0, 5]),
)
def test_broken_image_folders_fail_with_one_line(tmp_path_factory, train, test, classes, image_size):
    root = tmp_path_factory.mktemp("folder")
    for split, layout in (("train", train), ("test", test)):
        (root / split).mkdir()
        for c, files in enumerate(layout):
            folder = root / split / f"class{c}"
            folder.mkdir()
            for i, (kind, size) in enumerate(files):
                (folder / f"{i}.{'jpg' if kind == 'jpeg' else 'png'}").write_bytes(_image_bytes(kind, size, i))
    sources._load_raw.cache_clear()
    data = DataConfig(image_size=image_size, val_fraction=0.2)
    try:
        task = tasks.make_task("source", TaskConfig(dataset="folder", root=str(root), classes=tuple(classes)), data, 0)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    finally:
        sources._load_raw.cache_clear()
    assert task.num_classes >= 2 and len(task.train) > 0 and len(task.test) > 0
    assert task.train.images.dtype == np.uint8 and np.all(task.train.labels < task.num_classes)


@pytest.mark.parametrize("bad", [np.zeros((3, 4, 4, 2), np.uint8), np.zeros((4, 4), np.uint8)])
def test_wrong_image_shapes(bad):
    with pytest.raises(UserError, match="expected"):
        sources.prepare(bad, 0, 3)

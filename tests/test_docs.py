"""The method specification ships inside the repository (docs/methods.md) and in the sdist, keeps the section
numbers that docstrings cite, names only config fields that exist, and nothing in the package, configs,
benchmarks, tests or README points at a method spec outside the repository."""

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from dtl_jax.config import Config

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs/methods.md"
SECTIONS = ("1", "1.1", "1.2", "1.3", "1.4", "1.5", "2", "2.1", "2.2", "2.3", "2.4", "3")
SCANNED = ("dtl_jax", "configs", "benchmarks", "tests", "README.md")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def test_the_spec_has_every_cited_section():
    text = SPEC.read_text(encoding="utf-8")
    missing = [n for n in SECTIONS if not re.search(rf"^#{{2,4}} {re.escape(n)}\.? ", text, re.MULTILINE)]
    assert not missing, f"docs/methods.md lacks the headings of sections {missing}"


def test_the_spec_names_only_existing_config_fields():
    text = SPEC.read_text(encoding="utf-8")
    prefixes = "|".join(f.name for f in Config.__dataclass_fields__.values())
    named = set(re.findall(rf"`((?:{prefixes})\.[a-z_]+(?:\.[a-z_]+)*)`", text))
    assert len(named) >= 20  # the spec states its choices as config fields

    def resolves(dotted: str) -> bool:
        node = Config()
        for part in dotted.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    assert sorted(k for k in named if not resolves(k)) == []


def _scanned_files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
            continue
        for file in sorted(path.rglob("*")):
            if file.is_file() and not SKIPPED_DIRS & set(file.relative_to(ROOT).parts):
                yield file


def test_no_file_cites_a_method_spec_outside_the_repository():
    """Every mention of the method spec must be the in-repository path, spelled docs/methods.md (lower
    case, with the folder): the upper-case name was a file outside the repository that a user cannot open."""
    offenders = []
    for file in _scanned_files():
        text = file.read_bytes().decode("utf-8", errors="ignore")
        for match in re.finditer(r"methods\.md", text, re.IGNORECASE):
            if match.group() != "methods" + ".md" or text[max(0, match.start() - 5) : match.start()] != "docs/":
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{file.relative_to(ROOT)}:{line}")
    assert not offenders, f"{len(offenders)} references to a method spec outside the repository: {offenders[:20]}"


def test_the_sdist_ships_the_spec(tmp_path):
    """Builds an sdist from a copy of the checkout (so that nothing is written into it) and looks for the spec."""
    ignore = shutil.ignore_patterns(".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", *SKIPPED_DIRS)
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=ignore)
    out = tmp_path / "out"
    build = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    proc = subprocess.run(
        [sys.executable, "-c", build, str(out)], cwd=source, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = out.glob("dtl_jax-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in archive.getnames() if len(Path(n).parts) > 1}
        assert "docs/methods.md" in names
        member = next(m for m in archive.getmembers() if m.name.endswith("/docs/methods.md"))
        assert archive.extractfile(member).read() == SPEC.read_bytes()

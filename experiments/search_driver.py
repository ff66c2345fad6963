"""The driver used for the searches in default_search.md: one DTL run with dotted overrides, its table, the
disposal checks, and a JSON line appended to LOG (default ./search-log.jsonl).

    python experiments/search_driver.py WORKDIR data.image_size=16 disposal.gc_lambda=0.003 ...
"""

import json
import os
import sys
import time

from dtl_jax import config as C
from dtl_jax import dtl


def main() -> None:
    workdir, overrides = sys.argv[1], sys.argv[2:]
    cfg = C.apply_overrides(C.Config(), overrides)
    start = time.time()
    res = dtl.run(cfg, workdir, quiet=True, overwrite=True)
    elapsed = time.time() - start
    print(dtl.format_table(res))
    disposal = {}
    for method, d in res["disposal"].items():
        checks = [
            (c["step"], round(c["target_val_acc"], 3), round(c["source_val_acc"], 3), round(c["probe_acc"], 3))
            for c in d["checks"]
        ]
        print(method, "stopped", d["stopped_at"], "returned", d["returned_step"], "diverged", d["diverged"])
        print("  checks (step, target.val, source.val, probe)", checks)
        disposal[method] = {"returned": d["returned_step"], "stopped": d["stopped_at"], "checks": checks}
    models = {
        k: (round(v["target_acc"], 3), round(v["pl_acc"], 3), round(v["source_acc"], 3))
        for k, v in res["models"].items()
    }
    print("time", round(elapsed, 1))
    row = {"wd": workdir, "ov": overrides, "models": models, "disp": disposal, "time": round(elapsed, 1)}
    with open(os.environ.get("LOG", "search-log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

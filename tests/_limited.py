"""Run cases under an address-space limit, so that a regression cannot take the machine down.

Usage: ``python _limited.py BUDGET_MB CASES_JSON``. After the imports and a
small warm-up segmentation (threads and allocator arenas exist by then), the
process limits its address space to what it uses plus ``BUDGET_MB`` with
``resource.setrlimit(RLIMIT_AS)``; an input that makes the code allocate
more fails with ``MemoryError`` instead of swapping. Each case is a dict:
``{"name", "cli": [args]}`` (runs the CLI's ``main`` in this process) or
``{"name", "code": "..."}`` (Python that may set ``out``); one JSON line is
printed per finished case: name, rc, stdout, stderr, seconds, error.
"""

import contextlib
import io
import json
import resource
import sys
import time
import traceback


def vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def main() -> None:
    budget = int(sys.argv[1]) * 1024 * 1024
    cases = json.loads(sys.argv[2])
    import numpy as np
    import torch

    torch.set_num_threads(2)
    from napari_jointattn import segment
    from napari_jointattn.cli import main as cli
    from napari_jointattn.engine.models.model import new_model
    from napari_jointattn.model import DenseUNetConfig

    tiny = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                           head_channels=4, attention_dim=8, attention_levels=(1,))
    segment(np.random.rand(300, 300).astype(np.float32), new_model(config=tiny, classes=["a", "b"]),
            device="cpu", tile=128)
    limit = vm_size() + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"name": "__ready__", "limit_mb": limit // 2**20}), flush=True)
    for case in cases:
        out, err = io.StringIO(), io.StringIO()
        record = {"name": case["name"], "rc": None, "error": None}
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                if "cli" in case:
                    record["rc"] = cli(case["cli"])
                else:
                    scope = {"np": np, "segment": segment}
                    exec(case["code"], scope)
                    record["out"] = scope.get("out")
        except BaseException as exc:  # noqa: BLE001 - report everything, including MemoryError
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc()[-2000:]
        record.update(seconds=time.perf_counter() - t0, stdout=out.getvalue(), stderr=err.getvalue())
        print(json.dumps(record, default=str), flush=True)


if __name__ == "__main__":
    main()

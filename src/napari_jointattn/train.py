"""Data-parallel training: ``torchrun --nproc_per_node N -m napari_jointattn.train ARGS...``.

``ARGS`` are those of ``napari-jointattn train`` (the same parser). Each
process initialises ``torch.distributed`` from torchrun's environment
(``nccl`` on CUDA, process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``; ``gloo`` on
the CPU) and runs the same training; together they take the steps one
process takes with the same batch size (see
``napari_jointattn.engine.training.distributed`` and docs/scale.md). Only
rank 0 prints progress and the final line and writes the model file; the
other ranks' output is shown only if they fail. Without torchrun
(``WORLD_SIZE`` unset or 1) this is plain ``napari-jointattn train``.
"""

from __future__ import annotations

import contextlib
import io
import sys


def main(argv: list[str] | None = None) -> int:
    from . import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli._parser()
    try:
        args = parser.parse_args(["train", *argv])
    except SystemExit as exc:  # --help, usage errors: one line, status 2
        return int(exc.code or 0)
    from .engine.errors import BadInputError, one_line
    from .engine.training import distributed

    try:
        with distributed.process_group(args.device):
            if distributed.is_main():
                return cli.main(["train", *argv])
            # other ranks: quiet, unless they fail
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(["train", *argv])
            if code != 0:
                for line in (out.getvalue() + err.getvalue()).splitlines()[-20:]:
                    print(f"[rank {distributed.rank()}] {line}", file=sys.stderr)
            return code
    except BadInputError as exc:
        print(f"{cli.PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`distill` command line. Distillation itself arrives with issue 4; until then the command says so."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("error: `distill run` is not available in this version yet (tracked as issue 4)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

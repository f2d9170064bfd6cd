"""Follow a quantize request through the code, from ``compress.api.quantize`` down its call tree: the modules of
ours it passes through (in first-visit order) and its returns, each a call from one module back into a module
that is still on the stack below it (it had been left for a lower one: a callback, a closure or a lambda handed
down), counted once per (from, to) pair.

    OMP_NUM_THREADS=2 python benchmarks/request_path.py [--method gptq] [--lm-head-bits 8] [--avg-bits 4.5]

Run it on two revisions (e.g. in a git worktree) to compare the shape of the quantize path."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def ours(module: str) -> bool:
    return module.startswith(("compress", "distill"))


def follow(call, request) -> dict:
    """Trace ``call(request)``: the modules of ours entered, and the (from, to) pairs of calls back up."""
    stack: list[str] = []
    visited: list[str] = []
    returns: list[tuple[str, str]] = []

    importing = [0]  # module bodies run on import (registrations) are not part of the request's path

    def profile(frame, event, _arg):
        if frame.f_code.co_name == "<module>":
            importing[0] += 1 if event == "call" else -1 if event == "return" else 0
            return
        module = frame.f_globals.get("__name__", "")
        if importing[0] or not ours(module):
            return
        if event == "call":
            caller = stack[-1] if stack else None
            if module != caller and module in stack and (caller, module) not in returns:
                returns.append((caller, module))
            if module not in visited:
                visited.append(module)
            stack.append(module)
        elif event == "return" and stack:
            stack.pop()

    sys.setprofile(profile)
    try:
        call(request)
    finally:
        sys.setprofile(None)
    return {"modules": visited, "module_count": len(visited), "returns": [f"{a} -> {b}" for a, b in returns],
            "return_count": len(returns)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--lm-head-bits", type=int)
    parser.add_argument("--avg-bits", type=float)
    args = parser.parse_args()
    from compress.api import QuantizeRequest, quantize

    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text(" ".join(f"word{i % 97} text{i % 13}" for i in range(4000)))
        request = QuantizeRequest(model="tiny-llama", method=args.method, bits=4, group_size=32, calib=str(calib),
                                  nsamples=4, seqlen=32, out=str(Path(tmp) / "q"), progress=False, device="cpu",
                                  lm_head_bits=args.lm_head_bits, avg_bits=args.avg_bits)
        print(json.dumps(follow(quantize, request), indent=1))


if __name__ == "__main__":
    main()

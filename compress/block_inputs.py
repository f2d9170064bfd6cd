"""What each block receives, captured and replayed: the inputs of every block from the model's own forward
(``capture_block_inputs``), the per-window calls that replay them (``BlockInputs``), the groups of linear layers
in the order a block's forward calls them, and each layer's input Hessian. The driver (compress.driver) and the
methods that look inside a block (AWQ's search, the sensitivity pass, structured scoring) share these; none of
them calls back into the driver."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from compress.errors import UserError
from compress.moe import expert_groups

if TYPE_CHECKING:
    from compress.activations import Activations


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` (tensors nested in tuples, lists and dicts) with every tensor replaced by ``fn(tensor)``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def move(obj: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """``obj`` with its tensors on ``device``; a tensor reached twice (the mask every block of a layer
    type shares) is moved once and stays shared."""
    memo = {} if memo is None else memo

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in memo:
            memo[id(tensor)] = (tensor, tensor.to(device))  # keep it alive: its id must not be reused meanwhile
        return memo[id(tensor)][1]

    return map_tensors(obj, moved)


@dataclass
class BlockInputs:
    """What the blocks receive for each calibration window: the hidden states entering the current
    block, and everything else each block is called with (masks, rotary embeddings, per-layer keyword
    inputs), which differs by block where layer types differ (Gemma 2/3 sliding and global layers, a
    sliding window shorter than the sequence)."""

    hidden: "list[torch.Tensor] | Activations" = field(default_factory=list)
    hidden_as_kwarg: bool = False
    args: list[tuple] = field(default_factory=list)
    """Per window: the current block's positional inputs after the hidden states."""
    kwargs: list[dict] = field(default_factory=list)
    """Per window: the current block's keyword inputs."""
    per_block: list[list[tuple[tuple, dict]]] | None = None
    """[block][window] -> (args, kwargs) as the model's own forward gives them; None when only the first
    block was captured."""

    def use_block(self, index: int) -> None:
        """Make ``call`` give block ``index`` its own inputs."""
        if self.per_block is not None:
            self.args = [a for a, _ in self.per_block[index]]
            self.kwargs = [k for _, k in self.per_block[index]]

    def moved(self, device: torch.device) -> "BlockInputs":
        """The same inputs on ``device`` (hidden states held in a list too; an Activations store keeps
        its own device)."""
        memo: dict = {}
        return BlockInputs(move(self.hidden, device, memo), self.hidden_as_kwarg, move(self.args, device, memo),
                           move(self.kwargs, device, memo), move(self.per_block, device, memo))

    def raw_call(self, block: nn.Module, i: int, hidden: torch.Tensor | None = None):
        h = self.hidden[i] if hidden is None else hidden
        if self.hidden_as_kwarg:
            return block(*self.args[i], hidden_states=h, **self.kwargs[i])
        return block(h, *self.args[i], **self.kwargs[i])

    def call(self, block: nn.Module, i: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        out = self.raw_call(block, i, hidden)
        return out[0] if isinstance(out, (tuple, list)) else out


def _forward_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool, tuple, dict]:
    kwargs = dict(kwargs)
    if args:
        return args[0], False, tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), True, (), kwargs


class _SharedTensors:
    """One stored copy of equal tensors: every window of one length gets the same masks and rotary
    embeddings, which need not be kept once per window."""

    def __init__(self) -> None:
        self.kept: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, obj: Any) -> Any:
        return map_tensors(obj, self._one)

    def _one(self, tensor: torch.Tensor) -> torch.Tensor:
        same = self.kept.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), [])
        for kept in same:
            if kept is tensor or torch.equal(kept, tensor):
                return kept
        same.append(tensor)
        return tensor


def _model_call_failed(exc: Exception) -> bool:
    """An error the model's own forward raised on the stand-ins (what an untraceable architecture gives), as
    against the machine's limits (files, memory) or our own user errors, which keep their own message."""
    if isinstance(exc, (OSError, MemoryError, UserError, torch.OutOfMemoryError)):
        return False
    text = str(exc)
    return not (isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


_HOOK_STORES = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@contextmanager
def stood_in(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]) -> Iterator[None]:
    """Each block's forward replaced by ``forward_of(index)`` for the duration, without the blocks' own hooks
    (what observes a block must see it run, not a stand-in); everything restored after."""
    saved = [{name: getattr(block, name) for name in _HOOK_STORES} for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = forward_of(index)
        for name in _HOOK_STORES:
            setattr(block, name, type(saved[index][name])())
    try:
        yield
    finally:
        for block, hooks in zip(blocks, saved):
            del block.forward
            for name, store in hooks.items():
                setattr(block, name, store)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: list[torch.Tensor],
                         device: torch.device | None = None,
                         first_block_output: Callable[["BlockInputs"], Any] | None = None,
                         hidden: Any = None) -> BlockInputs:
    """Run the model on each window as far as its blocks and keep what they are given (``device``: where
    the modules before the first block are; default: where the first parameter is).

    Without ``first_block_output``, only the first block's inputs are kept (the model stops there).
    With it, every block's own inputs are kept: the blocks are stood in for by pass-throughs that record
    their inputs and hand the hidden states on unchanged, so the model's own code gives each block its
    mask, rotary embeddings and other per-layer inputs without any block's weights. A pass-through must
    return what the block returns (a tensor, or a tuple for some families): ``first_block_output``
    runs the real first block on window 0's captured inputs to show it. The first block's hidden states
    are appended to ``hidden`` as each window is run (a list by default; an Activations spills at its
    budget; an object whose append drops them when they will not be used)."""
    device = device or next(model.parameters()).device
    extra = _forward_kwargs(model)
    captured = BlockInputs()

    def grab(_module, args, kwargs):
        hidden, as_kwarg, rest, named = _split_hidden(args, kwargs)
        captured.hidden.append(hidden)
        captured.hidden_as_kwarg = as_kwarg
        captured.args.append(rest)
        captured.kwargs.append(named)
        raise _StopForward

    def run(window: torch.Tensor) -> None:
        try:
            model(window.unsqueeze(0).to(device), **extra)
        except _StopForward:
            pass

    def capture_first_block(some: list[torch.Tensor]) -> None:
        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for window in some:
                run(window)
        finally:
            handle.remove()

    if first_block_output is None:
        capture_first_block(windows)
        return captured
    capture_first_block(windows[:1])
    sample = first_block_output(captured)
    captured.hidden.clear()
    shared = _SharedTensors()
    per_block: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    hidden = [] if hidden is None else hidden
    last = len(blocks) - 1

    def stand_in(index: int):
        def forward(*args, **kwargs):
            h, _, rest, named = _split_hidden(args, kwargs)
            if index == 0:
                hidden.append(h)
            per_block[index].append(shared((rest, named)))
            if index == last:
                raise _StopForward
            return (h, *sample[1:]) if isinstance(sample, tuple) else h
        return forward

    try:
        with stood_in(blocks, stand_in):
            for window in windows:
                run(window)
    except Exception as exc:
        if not _model_call_failed(exc):
            raise  # a full disk while spilling, memory, our own checks: not a sign of an untraceable model
        raise UserError(f"{type(model).__name__}: the inputs of each block could not be traced through the "
                        f"model's forward ({type(exc).__name__}: {exc}); the block-by-block driver cannot "
                        "calibrate this architecture correctly") from exc
    if any(len(calls) != len(windows) for calls in per_block):
        counts = sorted({len(calls) for calls in per_block})
        raise UserError(f"{type(model).__name__}: its blocks were called {counts} times for {len(windows)} windows, "
                        "not once each in order: the block-by-block driver cannot calibrate this architecture")
    result = BlockInputs(hidden, captured.hidden_as_kwarg, per_block=per_block)
    result.use_block(0)
    return result


class HessianAccumulator:
    """Running H = 2/n * sum(x x^T) over every token a layer sees (n counts tokens)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.h = torch.zeros(columns, columns, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        before, self.n = self.n, self.n + x.shape[0]
        self.h.addmm_(x.t(), x, beta=before / self.n, alpha=2 / self.n)


@torch.no_grad()
def linear_call_groups(block: nn.Module, linears: dict[str, nn.Linear], inputs: BlockInputs) -> list[list[str]]:
    """Group the block's linear layers by shared input, in call order, from one forward pass.

    Experts (compress.moe) see only the tokens routed to them, so one window need not reach them all:
    their groups (each expert's gate+up, then its down) come from the module's structure and take the
    place where the first expert is called (at the end if window 0 reaches none)."""
    experts = expert_groups(block, set(linears))
    in_experts = {n for groups in experts.values() for g in groups for n in g}
    # Keep the input tensors themselves: holding them alive means two calls share an input only
    # when they got the very same tensor (an id() could be reused once a tensor is freed).
    calls: list[tuple[str, torch.Tensor | None]] = []
    seen: set[str] = set()
    handles = []
    for name, layer in linears.items():
        if name in in_experts:
            continue

        def record(_m, args, name=name):
            if name not in seen:
                seen.add(name)
                calls.append((name, args[0]))
        handles.append(layer.register_forward_pre_hook(record))
    for path in experts:
        def mark(_m, _args, path=path):
            if path not in seen:
                seen.add(path)
                calls.append((path, None))
        for expert in block.get_submodule(path):
            handles.append(expert.register_forward_pre_hook(mark))
    try:
        inputs.call(block, 0)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, tensor in calls:
        if name in experts:
            groups += experts[name]
            last_input = None
        elif groups and last_input is not None and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        if name not in experts:
            last_input = tensor
    for path, expert_list in experts.items():
        if path not in seen:
            groups += expert_list
    never_called = [n for n in linears if n not in seen and n not in in_experts]
    if never_called:
        raise UserError(f"layer {never_called[0]} is never called by its block's forward pass, so no data reaches "
                        f"it: leave it out with --exclude '{never_called[0]}'")
    return groups


@torch.no_grad()
def for_each_layer_call(block: nn.Module, layer: nn.Module, inputs: BlockInputs,
                        consume: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """Run every window through ``block`` only as far as ``layer``; hand its (input, output) to ``consume``."""

    def hook(_m, args, out):
        consume(args[0], out)
        raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        for i in range(len(inputs.hidden)):
            try:
                inputs.call(block, i)
            except _StopForward:
                pass
    finally:
        handle.remove()


def accumulate_hessian(block: nn.Module, linears: dict[str, nn.Linear], group: list[str],
                       inputs: BlockInputs) -> HessianAccumulator:
    """The Hessian of the input the group's layers share (q, k and v read the same tensor), over all
    windows, with the number of tokens that reached it; each pass stops as soon as the group's first
    layer has run (an expert no token of a window is routed to lets that window's pass run through)."""
    first = linears[group[0]]
    acc = HessianAccumulator(first.in_features, first.weight.device)
    for_each_layer_call(block, first, inputs, lambda x, _out: acc.add(x))
    return acc


def collect_hessian(block: nn.Module, linears: dict[str, nn.Linear], group: list[str],
                    inputs: BlockInputs) -> torch.Tensor:
    return accumulate_hessian(block, linears, group, inputs).h

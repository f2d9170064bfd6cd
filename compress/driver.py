"""The ONE layer-by-layer driver shared by every method that changes blocks (RTN, GPTQ, magnitude,
Wanda, SparseGPT, structured scoring), streaming or in memory.

Memory stays at one block: the inputs of the first block are captured once (the model runs only
up to it), then each block in turn is loaded on the device (read from the shards when streaming),
observed, changed, handed to ``finish_block`` (which packs and writes it), run forward once more
with its changed weights to produce the next block's inputs, and given back.

Inside a block the linear layers are processed in groups, in the order the forward pass calls them
(q/k/v together, then o, then gate/up, then down for a Llama): a group is the run of layers that
read the same input tensor. Each group is observed after the groups before it were changed, so it
sees the inputs the quantized model will really give it ("true sequential"). The groups come from
watching one forward pass, not from a table of architectures.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.activations import Activations
from compress.blocks import BlockSource
from compress.shards import DTYPES
from compress.errors import UserError
from compress.limits import DEFAULT_ACTIVATION_BUDGET
from compress.moe import expert_groups
from compress.runtime import current_rss_bytes
from compress.select import ModuleSelection, block_linears


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

    # The stand-ins run without the blocks' own hooks: what observes a block must see it run, not this.
    hook_stores = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                   "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    saved_hooks = [{name: getattr(block, name) for name in hook_stores} for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = stand_in(index)
        for name in hook_stores:
            setattr(block, name, type(saved_hooks[index][name])())
    try:
        for window in windows:
            run(window)
    except Exception as exc:
        if not _model_call_failed(exc):
            raise  # a full disk while spilling, memory, our own checks: not a sign of an untraceable model
        raise UserError(f"{type(model).__name__}: the inputs of each block could not be traced through the "
                        f"model's forward ({type(exc).__name__}: {exc}); the block-by-block driver cannot "
                        "calibrate this architecture correctly") from exc
    finally:
        for block, hooks in zip(blocks, saved_hooks):
            del block.forward
            for name, store in hooks.items():
                setattr(block, name, store)
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


LayerFn = Callable[[str, nn.Linear, "torch.Tensor | None"], "torch.Tensor | None"]
"""(qualified name, layer, hessian or None) -> the layer's new (dequantized) weight; without data (no
Hessian) it may return None when ``finish_block`` replaces the layer anyway."""

PrepareFn = Callable[[str, nn.Module, "dict[str, nn.Linear]", "list[list[str]]", BlockInputs, "set[str]"], None]
"""(block name, block, its selected linears, their call groups, the block's inputs, names of expert layers):
runs once per block, with data, before any of its layers is observed; it may change the block's float
weights without changing its function (AWQ folds its scales here)."""



@dataclass(frozen=True)
class DriverPlan:
    """What a run asks of the driver: where to start (resuming), where carried activations go when they
    would not fit in memory, how experts too few tokens reach are handled, and what to call after each
    block (to checkpoint it)."""

    start: int = 0
    """First block to process; the blocks before it were done by an earlier, interrupted run."""
    saved_hidden: dict | None = None
    """With ``start`` > 0: the hidden states that run carried out of block ``start - 1`` (Activations.save)."""
    spill_folder: Path | None = None
    activation_budget: int = DEFAULT_ACTIVATION_BUDGET
    block_done: Callable[[int, "Activations | None"], None] | None = None
    """(index of the block just finished, the states carried out of it) after it was handed over."""
    expert_min_fraction: float = 0.005
    """An expert that fewer than this fraction of the calibration tokens reach (at least 1 token) gets no
    Hessian: the method's data-free rule applies to it instead (RTN, magnitude), as in GPTQModel."""


@dataclass
class DriverReport:
    """What the driver measured while it ran (filled as it goes, so an interrupted run's report holds
    the blocks it finished)."""

    blocks: list[dict] = field(default_factory=list)
    """Per block processed: its index, seconds and the process's RSS after it."""
    experts: dict[str, dict] = field(default_factory=dict)
    """Expert layer -> tokens that reached it and whether the data-free rule applied."""
    expert_min_tokens: int | None = None
    """The token count below which an expert was handled data-free."""


def _first_block_output(source: BlockSource, first: BlockInputs, device: torch.device):
    """What the first block returns for window 0 (its shape tells the capture's stand-ins what to return)."""
    block = source.load(0, device)
    try:
        return first.moved(device).raw_call(block, 0)
    finally:
        source.unload(block, device)


class _Dropped:
    """Where a resumed run's capture puts the first block's states: nowhere (they come from its files)."""

    def append(self, _tensor) -> None:
        pass


def _restored(plan: DriverPlan, device: torch.device) -> Activations:
    saved = plan.saved_hidden
    size = Activations.nbytes(saved["count"], tuple(saved["shape"]), DTYPES[saved["dtype"]])
    spill = plan.spill_folder is not None and size > plan.activation_budget
    return Activations.restore(saved, device, plan.spill_folder if spill else None)


@torch.no_grad()
def run_layerwise(source: "BlockSource | nn.Module", windows: list[torch.Tensor] | None, layer_fn: LayerFn,
                  selection: ModuleSelection, device: torch.device, finish_block: Callable[[str, nn.Module], None],
                  desc: str, show_progress: bool = True, plan: DriverPlan | None = None,
                  report: DriverReport | None = None, prepare_block: PrepareFn | None = None,
                  observe: bool = True) -> str:
    """Visit every selected linear layer block by block, as ``plan`` says, recording into ``report``;
    returns the blocks' module path.

    ``source`` gives the blocks (a model in memory, or a streaming BlockSource). ``layer_fn`` returns
    the new weight for a layer; it is written into the layer at once so later groups and the next
    block see the changed model. ``finish_block`` is called when a block is done (to pack its layers
    and write them out). With ``windows`` None no data is observed and ``layer_fn`` gets no Hessian;
    with data, ``prepare_block`` sees each block first. With ``observe`` False the windows are carried
    through the blocks for ``prepare_block`` only: no Hessian is made and no layer is changed (a
    measuring pass).
    """
    source = source if isinstance(source, BlockSource) else BlockSource.in_memory(source)
    plan = plan or DriverPlan()
    report = report if report is not None else DriverReport()
    prefix, blocks = source.prefix, source.blocks
    if not any(block_linears(block, selection) for block in blocks):
        # Checked before any calibration work, for every method that uses this driver.
        raise UserError(f"no linear layer in the model's blocks matches --include {selection.include} / "
                        f"--exclude {selection.exclude}: widen the patterns")
    inputs = None
    if windows is not None and plan.start < len(blocks):  # a resumed run with every block done captures nothing
        carried = Activations([], device, plan.spill_folder, budget=plan.activation_budget) \
            if plan.saved_hidden is None else None
        with source.front(device) as front_device:
            inputs = capture_block_inputs(source.model, blocks, windows, front_device,
                                          first_block_output=lambda first: _first_block_output(source, first, device),
                                          hidden=carried if carried is not None else _Dropped())
        inputs = inputs.moved(device)
        inputs.hidden = carried if carried is not None else _restored(plan, device)
    tokens = sum(w.numel() for w in windows) if windows is not None else 0
    expert_min_tokens = report.expert_min_tokens = max(1, math.ceil(plan.expert_min_fraction * tokens))
    bar = tqdm(total=len(blocks), initial=plan.start, desc=desc, unit="block", disable=not show_progress,
               dynamic_ncols=True)
    try:
        for index in range(plan.start, len(blocks)):
            started = time.perf_counter()
            block_name = f"{prefix}.{index}"
            block = source.load(index, device)
            if inputs is not None:
                inputs.use_block(index)
            linears = block_linears(block, selection)
            if inputs is None:
                for name, layer in linears.items():
                    new_weight = layer_fn(f"{block_name}.{name}", layer, None)
                    if new_weight is not None:  # nothing runs the block again: a method may skip making it
                        layer.weight.data = new_weight.to(layer.weight.dtype)
            else:
                experts = {n for groups in expert_groups(block, set(linears)).values() for g in groups for n in g}
                groups = linear_call_groups(block, linears, inputs)
                if prepare_block is not None:
                    bar.set_postfix_str("preparing")
                    prepare_block(block_name, block, linears, groups, inputs, experts)
                for group in groups if observe else []:
                    bar.set_postfix_str(",".join(n.rsplit(".", 1)[-1] for n in group))
                    acc = accumulate_hessian(block, linears, group, inputs)
                    hessian = acc.h
                    if group[0] in experts:
                        starved = acc.n < expert_min_tokens
                        hessian = None if starved else hessian
                        for name in group:
                            report.experts[f"{block_name}.{name}"] = {"tokens": acc.n, "data_free": starved}
                    for name in group:
                        layer = linears[name]
                        layer.weight.data = layer_fn(f"{block_name}.{name}", layer, hessian).to(layer.weight.dtype)
                    del hessian, acc
                inputs.hidden.replace_all(lambda i: inputs.call(block, i))
            finish_block(block_name, block)
            source.unload(block, device)
            seconds = time.perf_counter() - started
            report.blocks.append({"index": index, "seconds": round(seconds, 3), "rss_bytes": current_rss_bytes()})
            if plan.block_done is not None:
                plan.block_done(index, inputs.hidden if inputs is not None else None)
            if tokens:
                bar.set_postfix_str(f"{tokens / seconds:,.0f} tok/s")
            bar.update(1)
    finally:
        bar.close()
    return prefix

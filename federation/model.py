"""Base model loading (QLoRA on CUDA, fp32 LoRA on CPU), LoRA wrapping, and the coordinator's adapter template."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from federation.config import LoraSettings, ModelConfig

log = logging.getLogger(__name__)

# Shapes of real models, random-initialised from config: for benchmarks and GPU checks without downloads.
PRESET_SHAPES: dict[str, dict[str, int | float]] = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0),
}

PRESET_NAMES = ("tiny", *PRESET_SHAPES)  # "tiny" takes its shape from ModelConfig.preset
QUANTIZATION_MODES = ("auto", "4bit", "none")
FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # model.compute_dtype, model.preset.dtype (torch names)


@dataclass
class LoadInfo:
    """What actually got loaded, for logs and metrics."""

    source: str
    device: str
    path: str  # "qlora-4bit-nf4" or "lora-fp32"
    trainable_params: int
    total_params: int


def resolve_device(cfg: ModelConfig) -> torch.device:
    """'auto' picks CUDA when present."""
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bitsandbytes_usable() -> bool:
    """bitsandbytes imports and sees a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken CUDA setup raises assorted errors at import
        log.warning("bitsandbytes unusable (%s); falling back to plain LoRA", exc)
        return False
    return True


def wants_qlora(cfg: ModelConfig, device: torch.device) -> bool:
    """Decide the QLoRA vs plain-LoRA path; '4bit' without CUDA is an error, not a silent fallback."""
    if cfg.quantization == "none":
        return False
    if cfg.quantization == "4bit":
        if device.type != "cuda" or not bitsandbytes_usable():
            raise RuntimeError("model.quantization=4bit needs a CUDA device with bitsandbytes")
        return True
    if cfg.quantization != "auto":
        raise ValueError(f"model.quantization must be one of {QUANTIZATION_MODES}, got {cfg.quantization!r}")
    return device.type == "cuda" and bitsandbytes_usable()


def preset_llama_config(cfg: ModelConfig, vocab_size: int):
    """The LlamaConfig of a preset: 'tiny' comes from cfg.preset, real shapes from PRESET_SHAPES."""
    from transformers import LlamaConfig

    if cfg.preset_name == "tiny":
        shape = {k: v for k, v in asdict(cfg.preset).items() if k != "dtype"}
        shape["vocab_size"] = shape["vocab_size"] or vocab_size
    elif cfg.preset_name in PRESET_SHAPES:
        shape = dict(PRESET_SHAPES[cfg.preset_name])
    else:
        raise ValueError(f"unknown model.preset_name {cfg.preset_name!r}; known: {', '.join(PRESET_NAMES)}")
    return LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _preset_key(cfg: ModelConfig) -> str:
    blob = json.dumps({"name": cfg.preset_name, "shape": asdict(cfg.preset), "seed": cfg.seed}, sort_keys=True)
    return f"{cfg.preset_name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def materialize_preset(cfg: ModelConfig) -> Path:
    """Build the preset (random weights from cfg.seed + local tokenizer) once into an HF directory; return it."""
    from transformers import AutoModelForCausalLM

    from federation.tokenizer import build_char_tokenizer

    out = Path(os.path.expanduser(cfg.cache_dir)) / _preset_key(cfg)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    config = preset_llama_config(cfg, vocab_size=len(tokenizer))
    dtype = getattr(torch, cfg.preset.dtype) if cfg.preset_name == "tiny" else torch.bfloat16
    torch.manual_seed(cfg.seed)
    # Random init of a billion-parameter shape takes minutes on CPU and seconds on a GPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Build in a temp dir and rename: concurrent sites/actors racing here never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process won the race; its copy is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built preset %s (%s params) at %s", cfg.preset_name, f"{model.num_parameters():,}", out)
    return out


def model_source(cfg: ModelConfig) -> str:
    """Hub id or local directory to from_pretrained from."""
    return str(materialize_preset(cfg)) if cfg.name == "preset" else cfg.name


def load_tokenizer(cfg: ModelConfig):
    """The base model's tokenizer, with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def peft_lora_config(lora: LoraSettings, base_name: str = ""):
    """peft.LoraConfig from our settings."""
    from peft import LoraConfig

    targets = lora.target_modules
    target_modules = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name or None,
    )


def load_base_model(cfg: ModelConfig):
    """Load the base causal LM: 4-bit NF4 + double quant + bf16 compute on CUDA, fp32 on CPU. Returns (model, path, device)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = resolve_device(cfg)
    source = model_source(cfg)
    if wants_qlora(cfg, device):
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
        )
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quant, dtype=getattr(torch, cfg.compute_dtype), device_map={"": device.index or 0}
        )
        path = "qlora-4bit-nf4"
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
        path = "lora-fp32"
    log.info("loaded base model %s on %s via the %s path", source, device, path)
    return model, path, device


def build_lora_model(model_cfg: ModelConfig, lora: LoraSettings):
    """Base model + LoRA adapter ready to train. Returns (peft_model, tokenizer, LoadInfo)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    base, path, device = load_base_model(model_cfg)
    if path.startswith("qlora"):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=model_cfg.gradient_checkpointing)
    elif model_cfg.gradient_checkpointing and device.type == "cuda":
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    model = get_peft_model(base, peft_lora_config(lora, model_source(model_cfg)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info = LoadInfo(model_source(model_cfg), str(device), path, trainable, total)
    log.info("LoRA r=%d on %s: %s trainable of %s params (%s)", lora.r, lora.target_modules, f"{trainable:,}",
             f"{total:,}", path)
    return model, load_tokenizer(model_cfg), info


def base_model_config(cfg: ModelConfig):
    """The base model's HF config without loading weights (coordinator side)."""
    from transformers import AutoConfig

    if cfg.name == "preset":
        from federation.tokenizer import build_char_tokenizer

        return preset_llama_config(cfg, vocab_size=len(build_char_tokenizer()))
    return AutoConfig.from_pretrained(cfg.name)


def lora_shapes(model_cfg: ModelConfig, lora: LoraSettings) -> dict[str, tuple[int, ...]]:
    """PEFT adapter key -> shape, from a meta-device model (no weights are materialised)."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(base_model_config(model_cfg))
        peft_model = get_peft_model(meta, peft_lora_config(lora))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def initial_adapter(model_cfg: ModelConfig, lora: LoraSettings) -> dict[str, np.ndarray]:
    """A fresh seeded adapter as PEFT initialises it: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0; float32.

    The coordinator never holds base weights, so it cannot call PEFT's own init; this reproduces
    PEFT's default (kaiming_uniform with a=sqrt(5)) from numpy so the result is identical on any machine.
    """
    rng = np.random.default_rng(lora.init_seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in sorted(lora_shapes(model_cfg, lora).items()):
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(shape[1])
            out[key] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[key] = np.zeros(shape, dtype=np.float32)
    return out

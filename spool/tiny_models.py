"""Random-weight models built without any download: tiny ones for tests and development,
real-size ones for GPU benchmarks.

The real diffusers and transformers classes are built from configs and saved with
`save_pretrained`, so the workers load them with `from_pretrained` exactly as they load
real models. Weights come from a fixed seed: the same build gives the same files.
Throughput does not depend on weight values, so a random-weight model with Stable
Diffusion 1.5's shapes (`sd15-random`) or a ~1.1B-parameter Llama (`llama-1b-random`)
measures what the real model would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 1234
SD_NAME = "tiny-sd"
LLM_NAME = "tiny-llm"


@dataclass(frozen=True)
class SdShape:
    """The shapes of a Stable-Diffusion-style pipeline (what sets its cost)."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    # Which UNet levels have cross-attention, from the top (full-resolution) level down.
    unet_attention: tuple[bool, ...]
    attention_head_dim: int | tuple[int, ...]
    cross_attention_dim: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    sample_size: int  # the image size the pipeline defaults to (the UNet's is 1/8 of it)
    half: bool = False  # saved as float16, as real checkpoints ship


@dataclass(frozen=True)
class LlmShape:
    """The shapes of a Llama-style causal LM and the size of its tokenizer's vocabulary."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    half: bool = False  # saved as float16, as real checkpoints ship


# Attention only at the lower resolution, with few heads: on a CPU, attention over the
# full-size latent costs more than the whole rest of the UNet.
TINY_SD = SdShape((32, 64), 1, (False, True), (2, 4), 32, (32, 64), 1, 32, 64, 2, 4, 64)
TINY_LLM = LlmShape(512, 64, 128, 2, 4, 2)
# Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder (~1.07B parameters).
SD15 = SdShape(
    (320, 640, 1280, 1280), 2, (True, True, True, False), 8, 768,
    (128, 256, 512, 512), 2, 768, 3072, 12, 12, 512, half=True,
)  # fmt: skip
# TinyLlama-1.1B's shapes: 22 layers of 2048, grouped-query attention with 4 KV heads.
LLAMA_1B = LlmShape(32000, 2048, 5632, 22, 32, 4, half=True)

# name -> (kind, shape); `build(name, folder)` makes any of them.
PRESETS: dict[str, tuple[str, SdShape | LlmShape]] = {
    SD_NAME: ("image.generate", TINY_SD),
    LLM_NAME: ("text.generate", TINY_LLM),
    "sd15-random": ("image.generate", SD15),
    "llama-1b-random": ("text.generate", LLAMA_1B),
}

# A file each finished build has; a folder without it is a leftover of a crashed build.
_MARKERS = {"image.generate": "model_index.json", "text.generate": "tokenizer.json"}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The LLM tokenizer's training text: enough for a few hundred merges, nothing more.
_CORPUS = [
    "A photograph of an astronaut riding a horse on the moon.",
    "The quick brown fox jumps over the lazy dog.",
    "Spool runs inference jobs: image generation and text generation on GPUs.",
    "Jobs are queued, claimed by a worker, batched, and their results are stored.",
    "Hello! How are you today? I am fine, thank you. What would you like to know?",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: {} [] () <> = + - * / %.",
    "The user asked a question and the assistant answered it in a short sentence.",
    "Once upon a time there was a small model that could only say random things.",
]


def init_tiny(var_dir: Path, force: bool = False) -> dict[str, Path]:
    """Build tiny-sd and tiny-llm under `var_dir/models`; skip those present unless `force`."""
    return init_models(var_dir, [SD_NAME, LLM_NAME], force)


def init_models(
    var_dir: Path,
    names: list[str],
    force: bool = False,
    shapes: dict[str, SdShape | LlmShape] | None = None,
    folder: str = "models",
) -> dict[str, Path]:
    """Build the PRESETS `names` under `var_dir/folder`; skip those present unless `force`.
    `shapes` overrides a preset's shape (a smoke run's tiny model under a real model's name)."""
    root = Path(var_dir) / folder
    root.mkdir(parents=True, exist_ok=True)
    _quiet(Path(var_dir))
    paths: dict[str, Path] = {}
    for name in names:
        target = root / name
        if force or not is_built(name, target):
            build(name, target, (shapes or {}).get(name))
        paths[name] = target
    return paths


def is_built(name: str, folder: Path) -> bool:
    return (Path(folder) / _MARKERS[PRESETS[name][0]]).is_file()


def build(name: str, target: Path, shape: SdShape | LlmShape | None = None) -> None:
    """Build the preset `name` into `target`, replacing what is there; with `shape`, that
    shape instead of the preset's (a smoke run's tiny model under a real model's name)."""
    shape = shape or PRESETS[name][1]
    builder: Callable[[Path], None]
    if isinstance(shape, SdShape):
        builder = lambda out: _save_sd(out, shape)  # noqa: E731
    else:
        builder = lambda out: _save_llm(out, shape)  # noqa: E731
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    _build_atomically(Path(target), builder)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    # Build beside the target and rename, so a worker never loads a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        _make_readable(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    # safetensors writes 0600; workers may run as another user than `spool models init-tiny`.
    for path in [folder, *folder.rglob("*")]:
        extra = stat.S_IRGRP | stat.S_IROTH
        if path.is_dir():
            extra |= stat.S_IXGRP | stat.S_IXOTH
        path.chmod(path.stat().st_mode | extra)


def _quiet(var_dir: Path) -> None:
    # Before the first diffusers import: it creates an inductor cache (under /tmp by default).
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(var_dir.resolve() / "cache" / "inductor"))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _save_clip_tokenizer(folder: Path) -> None:
    """A byte-level CLIP tokenizer with no merges, written as files (no download)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    for char in sorted(ByteLevel.alphabet()):
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # Loading from the folder is what builds a working tokenizer in transformers 5;
    # the constructor with vocab_file= ignores the files.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)


def sd_modules(shape: SdShape, tokenizer: Any) -> tuple[Any, Any, Any]:
    """The UNet, VAE and text encoder of `shape`, with random weights (torch's current
    generator and device: under `torch.device("meta")` they cost nothing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=shape.sample_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=shape.unet_channels,
        layers_per_block=shape.unet_layers,
        down_block_types=tuple(
            "CrossAttnDownBlock2D" if a else "DownBlock2D" for a in shape.unet_attention
        ),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(shape.unet_attention)
        ),
        cross_attention_dim=shape.cross_attention_dim,
        attention_head_dim=shape.attention_head_dim,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=shape.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(shape.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(shape.vae_channels),
        latent_channels=4,
        layers_per_block=shape.vae_layers,
        norm_num_groups=32,
        sample_size=shape.sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_intermediate,
            num_hidden_layers=shape.text_layers,
            num_attention_heads=shape.text_heads,
            # The pipeline pads every prompt to the tokenizer's 77 positions.
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=shape.text_hidden,
        )
    )
    return unet, vae, text_encoder


def _save_sd(out: Path, shape: SdShape) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = out / "_clip_tokenizer"
    _save_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet, vae, text_encoder = sd_modules(shape, tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe: Any = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if shape.half:
        pipe.to(torch.float16)
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)


def _save_llm(out: Path, shape: LlmShape) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(shape.vocab), trainer=trainer)
    bos_id = bpe.token_to_id("<s>")
    # Plain prompts start with <s> like a real Llama; the chat template writes its own.
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = llm_model(shape, tokenizer)
    if shape.half:
        model.half()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def llm_model(shape: LlmShape, tokenizer: Any) -> Any:
    """The causal LM of `shape`, with random weights (see `sd_modules`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=4096,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )


def _corpus(vocab: int) -> list[str]:
    """The tokenizer's training text: the sentences above, plus, for a real-size vocabulary,
    made-up words (a fixed seed) with enough distinct pairs for that many merges."""
    if vocab <= 1024:
        return _CORPUS
    rng = random.Random(SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(vocab * 2)]
    return _CORPUS + [" ".join(rng.choices(words, k=200)) for _ in range(vocab // 16)]

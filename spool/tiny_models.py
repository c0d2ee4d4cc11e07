"""Tiny random-weight models for tests and development, built without any download.

The real diffusers and transformers classes are built from small configs and saved
with `save_pretrained`, so the workers load them with `from_pretrained` exactly as they
load real models. Weights come from a fixed seed: the same build gives the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 1234
SD_NAME = "tiny-sd"
LLM_NAME = "tiny-llm"

# A file each finished build has; a folder without it is a leftover of a crashed build.
_MARKERS = {SD_NAME: "model_index.json", LLM_NAME: "tokenizer.json"}

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
    root = Path(var_dir) / "models"
    root.mkdir(parents=True, exist_ok=True)
    _quiet(Path(var_dir))
    builders: dict[str, Callable[[Path], None]] = {SD_NAME: _save_sd, LLM_NAME: _save_llm}
    paths: dict[str, Path] = {}
    for name, build in builders.items():
        target = root / name
        if force or not (target / _MARKERS[name]).is_file():
            _build_atomically(target, build)
        paths[name] = target
    return paths


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


def _save_sd(out: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = out / "_clip_tokenizer"
    _save_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            # Attention only at the lower resolution, with few heads: on a CPU, attention over
            # the full-size latent costs more than the whole rest of the UNet.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                # The pipeline pads every prompt to the tokenizer's 77 positions.
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=32,
            )
        )
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
    pipe.save_pretrained(out)
    shutil.rmtree(tok_dir)


def _save_llm(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
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
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=False,
            )
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

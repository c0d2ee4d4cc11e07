"""The tiny models: real classes, saved and loaded like real models, deterministic."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import Any

import pytest

from spool.tiny_models import init_tiny


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_builds_loadable_real_models(tiny_models: dict[str, Path]) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["tiny-sd"], local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.text_encoder.config.max_position_embeddings >= pipe.tokenizer.model_max_length == 77
    # The offline CLIP tokenizer must give real byte-level ids, not unknown tokens.
    ids = pipe.tokenizer("a red fox").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.unk_token_id not in ids[1:-1] and len(ids) > 3

    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llm"], local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-llm"], local_files_only=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "Héllo wörld, 3 + 4 = 7 🙂"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(chat, str)
    assert chat.startswith(tokenizer.bos_token) and chat.endswith("<|assistant|>\n")


def test_files_are_readable_by_others(tiny_models: dict[str, Path]) -> None:
    for folder in tiny_models.values():
        for path in folder.rglob("*"):
            assert path.stat().st_mode & stat.S_IROTH, path


def test_skips_existing_and_rebuilds_on_force(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    first = init_tiny(tmp_path)
    weights = first["tiny-llm"] / "model.safetensors"
    inode = weights.stat().st_ino
    assert init_tiny(tmp_path) == first
    assert weights.stat().st_ino == inode  # left alone
    init_tiny(tmp_path, force=True)
    assert weights.stat().st_ino != inode  # written again
    # Fixed seeds: a rebuild, like a build elsewhere, gives the same bytes.
    for name, folder in first.items():
        assert _digests(folder) == _digests(tiny_models[name]), name


def test_rebuilds_a_half_written_folder(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    leftover = tmp_path / "models" / "tiny-sd"
    leftover.mkdir(parents=True)
    (leftover / "junk.bin").write_bytes(b"x")
    init_tiny(tmp_path)
    assert (leftover / "model_index.json").is_file()
    assert not (leftover / "junk.bin").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-llm"])
def test_models_are_small(tiny_models: dict[str, Path], name: str) -> None:
    size = sum(p.stat().st_size for p in tiny_models[name].rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024


def test_registry_points_at_the_tiny_models(tiny_models: dict[str, Path]) -> None:
    from spool import registry

    specs: dict[str, Any] = registry.load(registry.DEFAULT_FILE)
    var_dir = tiny_models["tiny-sd"].parent.parent
    for name, kind in (("tiny-sd", "image.generate"), ("tiny-llm", "text.generate")):
        spec = specs[name]
        assert spec.kind == kind
        assert Path(spec.resolved_source(var_dir)) == tiny_models[name]
    assert specs["tiny-sd"].max_batch_size == 8 and specs["tiny-llm"].max_batch_size == 16
    assert specs["tiny-sd"].limit("max_width") and specs["tiny-llm"].limit("max_tokens")


def test_real_size_presets_have_the_real_models_shapes(tmp_path: Path) -> None:
    # Built on the meta device: the shapes without the gigabytes.
    import torch
    from transformers import CLIPTokenizer

    from spool import tiny_models

    tiny_models._save_clip_tokenizer(tmp_path)
    clip = CLIPTokenizer.from_pretrained(tmp_path)
    with torch.device("meta"):
        unet, vae, text = tiny_models.sd_modules(tiny_models.SD15, clip)
        llm = tiny_models.llm_model(tiny_models.LLAMA_1B, _VocabOf(tiny_models.LLAMA_1B.vocab))

    def millions(module: Any) -> float:
        return sum(p.numel() for p in module.parameters()) / 1e6

    assert round(millions(unet), 1) == 859.5  # Stable Diffusion 1.5's UNet
    assert round(millions(vae), 1) == 83.7
    assert text.config.hidden_size == 768 and text.config.num_hidden_layers == 12
    assert unet.config.sample_size * 8 == vae.config.sample_size == 512
    assert 1090 < millions(llm) < 1110  # TinyLlama-1.1B's shapes
    assert llm.config.num_key_value_heads == 4


def test_a_preset_builds_with_another_shape_under_its_name(tmp_path: Path) -> None:
    # What a benchmark's smoke run does: the real model's name, the tiny model's shape.
    from spool import tiny_models

    shapes = {"llama-1b-random": tiny_models.TINY_LLM}
    paths = tiny_models.init_models(tmp_path, list(shapes), shapes=shapes, folder="smoke")
    folder = paths["llama-1b-random"]
    assert folder == tmp_path / "smoke" / "llama-1b-random"
    assert tiny_models.is_built("llama-1b-random", folder)
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 10 * 1024 * 1024


class _VocabOf:
    """What llm_model reads of a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def test_a_misspelt_registry_setting_is_an_error_naming_it(tmp_path: Path) -> None:
    from spool import registry

    path = tmp_path / "models.yaml"
    path.write_text("models:\n  sd:\n    kind: image.generate\n    vae_tilling: true\n")
    with pytest.raises(registry.RegistryError) as err:
        registry.load(path)
    assert "model 'sd': unknown setting(s) vae_tilling for image.generate" in str(err.value)
    assert "vae_tiling" in str(err.value)  # what it may have meant
    path.write_text("models:\n  llm:\n    kind: text.generate\n    vae_tiling: true\n")
    with pytest.raises(registry.RegistryError, match="unknown setting"):
        registry.load(path)  # an image setting on a text model

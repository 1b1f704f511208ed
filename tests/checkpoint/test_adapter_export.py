"""Issue 15 (2): ``export --lora-only`` writes adapters diffusers' Wan LoRA loaders load (the ComfyUI / Wan
``diffusion_model.`` names with ``.alpha`` by default, or diffusers' own format): every trained linear is
loaded and the output equals the merged export's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvpo_megatron.checkpoint.convert import ImportSpec, export_checkpoint, export_lora, import_checkpoint
from kvpo_megatron.errors import ConfigError
from tests.helpers import max_output_error, random_peft_lora, tiny_diffusers, wan_state_dict

RANK, ALPHA = 4, 8.0


def _via_pipeline(adapter_dir: Path):
    """The tiny reference transformer with an adapter loaded by ``WanPipeline.load_lora_weights``."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=tiny_diffusers(0))
    pipe.load_lora_weights(str(adapter_dir))
    return pipe.transformer


def _via_transformer(adapter_dir: Path):
    """... loaded by ``WanTransformer3DModel.load_lora_adapter``."""
    transformer = tiny_diffusers(0)
    transformer.load_lora_adapter(str(adapter_dir), weight_name="pytorch_lora_weights.safetensors")
    return transformer


def _lora_layers(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_lora_only_export_loads_in_diffusers(tmp_path):
    from diffusers import WanTransformer3DModel

    ref = tiny_diffusers(0)
    torch.save({"model": {"model." + k: v for k, v in wan_state_dict(ref).items()}}, tmp_path / "base.pt")
    lora = random_peft_lora(192, rank=RANK, seed=5)  # rank 4 over all 10 linears of both blocks; alpha 8 (scale 2)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    out = tmp_path / "imp"
    import_checkpoint(ImportSpec(fmt="memflow", src=str(tmp_path / "base.pt"), out=str(out),
                                 lora=str(tmp_path / "lora.pt"), lora_alpha=ALPHA, progress=False))
    export_checkpoint(out, tmp_path / "merged", to="diffusers", merge_lora=True)
    merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged").eval()
    assert max_output_error(ref, merged, ours=False) > 1e-3  # the LoRA matters
    export_lora(out, tmp_path / "comfy")  # the default
    export_lora(out, tmp_path / "diffusers", fmt="diffusers")
    assert [p.name for p in (tmp_path / "comfy").iterdir()] == ["lora.safetensors"]
    for load in (_via_pipeline(tmp_path / "comfy"), _via_pipeline(tmp_path / "comfy" / "lora.safetensors"),
                 _via_pipeline(tmp_path / "diffusers"), _via_transformer(tmp_path / "diffusers")):
        assert _lora_layers(load) == len(lora) // 2 == 20
        assert max_output_error(merged, load.eval(), ours=False) <= 1e-5
    with pytest.raises(ConfigError, match="--lora-names applies to --lora-format peft only"):
        export_lora(out, tmp_path / "x", names="wan")
    with pytest.raises(ConfigError, match="--lora-format must be one of"):
        export_lora(out, tmp_path / "x", fmt="kohya")

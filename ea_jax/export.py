"""Export a model to a Hugging Face folder that transformers loads without ea_jax.

    python -m ea_jax.export --model=runs/consequentialism_narrow/sft/model --output=exported/

The folder contains config.json, model.safetensors, generation_config.json and the tokenizer files
with the chat template, so `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` reproduce the model's logits and prompts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from absl import app, flags

from ea_jax import io
from ea_jax.loading import LoadedModel, load_model, params_to_hf_state

logger = logging.getLogger(__name__)

_MODEL = flags.DEFINE_string("model", None, "Model to export: 'default', a .gguf file or a model folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to create; it must not exist yet.")


class ExportError(ValueError):
    """An export target that cannot be written."""


def export_hf_folder(model: LoadedModel, output: str | Path) -> Path:
    """Write `model` as a Hugging Face folder at `output`, staged and renamed when complete."""
    from safetensors.numpy import save_file

    output = Path(output)
    if output.exists():
        raise ExportError(f"{output} already exists; choose a new folder or delete it first")
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        hf_state = params_to_hf_state(model.config, model.params)
        save_file(hf_state, str(staging / "model.safetensors"), metadata={"format": "pt"})

        config = model.config.to_hf_config()
        config["torch_dtype"] = "float32"
        io.atomic_write_json(staging / "config.json", config)
        eos = list(model.eos_token_ids)
        generation_config = {
            "bos_token_id": model.config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": model.tokenizer.pad_token_id,
        }
        io.atomic_write_json(staging / "generation_config.json", generation_config)
        model.tokenizer.save_pretrained(str(staging))
        io.atomic_write_json(staging / "ea_jax_export.json", {"model_id": model.model_id, "source": model.source})
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("exported %s to %s", model.model_id, output)
    return output


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not _MODEL.value or not _OUTPUT.value:
        raise app.UsageError("--model and --output are required")
    path = export_hf_folder(load_model(_MODEL.value), _OUTPUT.value)
    print(json.dumps({"exported": str(path)}))


if __name__ == "__main__":
    app.run(main)

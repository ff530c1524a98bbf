"""ea_jax: emergent-alignment experiments in JAX/Flax.

Modules, one per concept: `model` (Flax NNX Llama decoder), `loading` (GGUF and Hugging Face
folders), `sharding` (mesh and logical-axis rules), `generation` (batched KV-cache sampler),
`constitutions`, `prompts`, `cai` (critique/revision data), `sft`, `judges`, `persona`,
`evaluation`, `stats`, `report` and `main` (the end-to-end job).
"""

__version__ = "0.1.0"

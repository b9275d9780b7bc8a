"""Sharing LoRA files: where each tool puts their keys, a compatibility check, and convert / merge / resize / extract.

One job a module:

- `keymaps`: the base model's LoRA-able modules (`ModelLayout`) and, for AUTOMATIC1111/Forge, ComfyUI and
  diffusers, which module each tool patches with a file's key;
- `formats`: reading every LoRA layout dreamlora accepts (kohya, diffusers/peft, diffusers' older
  attention-processor keys, cloneofsimo's `lora`) into one form, and writing kohya and diffusers files;
- `check`: the compatibility check run before every write and by `dreamlora check`;
- `convert`, `merge`, `resize`, `extract`: the commands of the same names;
- `lowrank`: the SVD that resize and extract share; `hashes` and `thumbnail`: metadata UIs show.

Nothing here is imported by `import dreamlora`; torch and the model libraries load when a function runs.
"""

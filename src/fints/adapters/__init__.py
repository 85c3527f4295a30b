"""Per-user and task LoRA adapters (PEFT): training, storage beside the users' data,
and the ``lora`` generation mode (each row of a batch through its user's adapter, with
steering on top: the plug-in mode).

Import the modules themselves (``fints.adapters.training``, ``.storage``, ``.mode``);
this package imports nothing heavy.
"""

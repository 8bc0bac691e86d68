"""qlora-diagnostics: when does QLoRA (LoRA on an NF4 base) match 16-bit LoRA?"""

"""The 4-bit base of QLoRA: quantize and save it, and measure what quantization does to it.

QLoRA (Dettmers et al. 2023) stores each frozen linear weight W as 4-bit codes plus one absmax
constant per block of 64 weights, and optionally quantizes those constants again ("double
quantization"); the adapter is then trained against dequant(Q(W)), not W. This package

- writes that 4-bit model with transformers + bitsandbytes (:mod:`.save`),
- measures the error of Q for one weight matrix and its storage as small pure functions over
  tensors (:mod:`.roundtrip`: the round trip, relative error, cosine, bits per parameter against
  the paper's accounting of 4.5 / 4.127 bits),
- applies them to a whole model, module by module (:mod:`.per_module`: the error table per
  configuration nf4/fp4 x double quant, storage from the tensors really stored, to check the
  commonly quoted "QLoRA ~ 0.52 bytes per parameter", and the residuals W - dequant(Q(W)) that
  the comparison tests the QLoRA adapter against),
- condenses the table into the ``quantize`` stage's metrics (:mod:`.summary`).

Weights are taken as out x in (nn.Linear's layout; a GPT-2 Conv1D weight is transposed), the
layout bitsandbytes quantizes, so the blocks of 64 run along input features as in the model.
"""

"""Memory of each ``train.precision`` mode (docs/trainer.md): ``python benchmarks/precision_memory.py MODE``.

One process per mode (Linux: reads the peak-RSS high-water mark from ``/proc/self/status``). A Llama built from
config (hidden 256, 4 layers, vocab 8000, tied embeddings, 5.0M parameters), two AdamW steps on 8 x 128 tokens
with the model's own cross-entropy under the mode's autocast / gradient scaler. Prints the bytes per parameter
held by weights + gradients + AdamW states (counted from the tensors) and the peak extra RSS (building the model
included).
"""

from __future__ import annotations

import re
import sys

import torch


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


def main(mode: str) -> str:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if mode not in ("fp32", "bf16", "bf16-mixed", "fp16-mixed"):
        raise SystemExit(f"mode must be fp32, bf16, bf16-mixed or fp16-mixed, got {mode!r}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randint(0, 8000, (8, 128))
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark
    c = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16 if mode == "bf16" else torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu") if mode == "fp16-mixed" else None
    dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(mode)
    n = sum(p.numel() for p in model.parameters())
    held = 0
    for step in range(2):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(input_ids=x, labels=x).loss
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        if step == 0:
            held = sum(p.nbytes + p.grad.nbytes for p in model.parameters()) + sum(
                t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        opt.zero_grad(set_to_none=False)
    return (f"{mode}: {n} parameters, {held / n:.2f} B/param (weights + grads + AdamW), peak extra RSS "
            f"{(_status('VmHWM') - base) / 2**20:.1f} MiB")


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else "fp32"))

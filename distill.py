"""
Skip-layer distillation: a frozen full-model teacher teaches a student to survive skipped layers.

    python distill.py config/distill_cpu.py     # the stdlib model; any checkpoint works, e.g. a converted Phi-3

Top-down over every other layer, l = L-2, L-4, ..., 2 (never the first or the last), for
steps_per_layer steps each, the student minimizes

    KL(teacher || student with every layer) + w * KL(teacher || student without layer l)

(T = 1, the teacher's distribution as the target, as in the reference code). "Without layer l" also
skips the layers distilled before it: a distilled layer stays skippable, and the final student is
meant to run with all of them skipped. We train every block of the student (embedding and head stay
frozen): the reference trains block l alone, but block l is absent from the "without" path, so the
second term would give it no gradient; the blocks around it are what can learn to do without it.
After each layer, the validation perplexity of the student and of the original model with the same
layers skipped is printed; the student (and the distilled layers, in metrics.jsonl) land in out_dir,
saved as one unit (savedir.py) once its weights and validation losses are checked.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import savedir
from configurator import configure, run_main
from data.instruct import IGNORE
from model import Transformer, layer_mask
from rules import at_least, check_values
from train import (TRAIN_RULES, TrainConfig, check_val_loss, copy_tokenizer, kept, load_data, log_metrics,
                   nonfinite_tensor, publish_metrics, run_inputs, start_metrics, val_loss_limit)


@dataclass
class DistillConfig(TrainConfig):
    init_from: str = "out"           # the teacher (and the student's starting point)
    out_dir: str = "out-distill"
    kl_weight: float = 0.01          # w: weight of the KL of the student without the layer
    steps_per_layer: int = 40        # optimizer steps per distilled layer
    layers: str = ""                 # default L-2, L-4, ..., 2; or a comma list, distilled in that order
    lr: float = 3e-4
    eval_batches: int = 10


def distill_layers(spec, n_layer):
    if not spec:
        return list(range(n_layer - 2, 1, -2))
    layers = [int(s) for s in spec.split(",")]
    if not all(0 < l < n_layer - 1 for l in layers):
        raise ValueError(f"layers {spec!r}: distilled layers must lie in [1, {n_layer - 2}] (never the first or last)")
    return layers


def kl_to_teacher(student_logits, teacher_logits, targets):
    """KL(teacher || student) averaged over the tokens that have a target ([B, T, V] logits, fp32):
    every token of plain text; the response tokens of instruction data (never padding)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # [B, T]
    keep = targets != IGNORE
    return kl[keep].mean()


@torch.no_grad()
def val_loss(model, val_batch, batches, skip_layers=()):
    mask = layer_mask(skip_layers, model.n_layer)
    return sum(model(x, y, skip_mask=mask)[0].item() for x, y in map(val_batch, range(batches))) / batches


DISTILL_RULES = {**TRAIN_RULES, "kl_weight": at_least(0), "steps_per_layer": at_least(1)}


def main():
    cfg = check_values(configure(DistillConfig()), DISTILL_RULES)
    savedir.check_target(cfg.out_dir, savedir.STUDENT, run_inputs(cfg))
    torch.manual_seed(cfg.seed)
    train_batch, val_batch, _, _, tok_file = load_data(cfg)
    teacher = Transformer.from_pretrained(cfg.init_from).requires_grad_(False)
    student = Transformer.from_pretrained(cfg.init_from).train()
    student.tok_emb.requires_grad_(False)
    student.lm_head.requires_grad_(False)
    L = student.n_layer
    layers = distill_layers(cfg.layers, L)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
    out_lock = savedir.claim(cfg.out_dir, savedir.STUDENT, run_inputs(cfg))  # noqa: F841 (held until exit)
    metrics = start_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), 0)  # metrics.jsonl once the student is saved
    base = val_loss(teacher, val_batch, cfg.eval_batches)
    print(f"distilling layers {layers} of {L}, {cfg.steps_per_layer} steps each; teacher val loss {base:.4f}")
    done, step = [], 0
    for layer in layers:
        without = layer_mask(done + [layer], L)
        for _ in range(cfg.steps_per_layer):
            x, y = train_batch(step, 0)
            teacher_logits = teacher(x)
            loss = kl_to_teacher(student(x), teacher_logits, y) + \
                cfg.kl_weight * kl_to_teacher(student(x, skip_mask=without), teacher_logits, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        done.append(layer)
        student.eval()
        row = {"layer": layer, "skipped": list(done), "teacher": base,
               "student_full": val_loss(student, val_batch, cfg.eval_batches),
               "student_skipping": val_loss(student, val_batch, cfg.eval_batches, done),
               "original_skipping": val_loss(teacher, val_batch, cfg.eval_batches, done)}
        student.train()
        # the teacher's loss is the best so far: a student past ln V (max_val_loss) has collapsed
        check_val_loss({L: row["student_full"]}, L, base, val_loss_limit(cfg, student.cfg.vocab_size), step, cfg)
        log_metrics(metrics, row)
        ppl = {k: math.exp(min(v, 50)) for k, v in row.items() if k not in ("layer", "skipped")}
        print(f"layer {layer:2d}: perplexity with layers {done} skipped: student {ppl['student_skipping']:.2f}, "
              f"original {ppl['original_skipping']:.2f}; all layers: student {ppl['student_full']:.2f}, "
              f"teacher {ppl['teacher']:.2f}")
    bad = nonfinite_tensor(student.state_dict())
    if bad:
        raise ValueError(f"student weight {bad} holds NaN or inf; stopping without saving: {kept(cfg)}")

    def write(nxt):
        student.save_pretrained(nxt)
        copy_tokenizer(tok_file, nxt)
    savedir.save(cfg.out_dir, savedir.STUDENT, write, layers=done)
    publish_metrics(metrics)
    print(f"saved the student to {cfg.out_dir}/; sample with --skip_layers {','.join(map(str, sorted(done)))}")


if __name__ == "__main__":
    run_main(main)

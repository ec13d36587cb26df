"""Does a per-tenant logit calibration give back what a fine-tune lost of the base, on the demo's tenants?

"Fine-tuning is fine, if calibrated" (Mai et al., 2024): a fine-tune forgets little of what the base knew; most
of what it loses is a bias of its output logits towards the fine-tuning data, which a post-hoc calibration of the
logits restores. Here the calibration is one bias vector over the vocabulary per tenant, added to the fine-tune's
logits, fitted (Adam, cross-entropy) on calibration text of both domains: the first half of the demo's held-out
base-domain text and of the tenant's. Measured on the second halves, which nothing was fitted on:

  base-domain loss restored   (loss_ft - loss_calibrated) / (loss_ft - loss_base) on base-domain text: 1 = the
                              base's loss there is back, 0 = nothing restored, < 0 = worse
  tenant gain kept            (loss_base - loss_calibrated) / (loss_base - loss_ft) on the tenant's text:
                              1 = all of the fine-tune's gain kept

Tenants: german, spanish, bofh (full fine-tunes) and italian (its LoRA merged). Losses are mean next-token
cross-entropy (nats) through transformers in float32, windows of 256 tokens, at most --tokens per half.

Usage:  python bench/calibration.py [--tokens 4096] [--steps 300] [--out bench/results/calibration-<date>.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.decode import git_commit, write_result  # noqa: E402

ASSETS = ROOT / "serving" / "demo" / "assets"
TENANTS = ("german", "spanish", "bofh", "italian")
WINDOW = 256


def windows(ids: list[int]) -> list[torch.Tensor]:
    return [torch.tensor(ids[i : i + WINDOW]) for i in range(0, len(ids) - 1, WINDOW) if len(ids[i : i + WINDOW]) > 1]


@torch.no_grad()
def logits_and_targets(model, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every predicted position's logits [N, V] and its target token [N]."""
    logits, targets = [], []
    for w in parts:
        out = model(w[None]).logits[0, :-1].float()
        logits.append(out)
        targets.append(w[1:])
    return torch.cat(logits), torch.cat(targets)


def loss(logits: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    return float(F.cross_entropy(logits if bias is None else logits + bias, targets))


def fit_bias(pairs: list[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float) -> torch.Tensor:
    """One bias over the vocabulary minimising the mean of each text's cross-entropy (each text weighs the same)."""
    bias = torch.zeros(pairs[0][0].shape[1], requires_grad=True)
    opt = torch.optim.Adam([bias], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        total = sum(F.cross_entropy(lg + bias, t) for lg, t in pairs) / len(pairs)
        total.backward()
        opt.step()
    return bias.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens per half of each text (fit, measure)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.evaluation import merge_lora

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ASSETS / "base")

    def halves(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ids = tok((ASSETS / "heldout" / f"{name}.txt").read_text(encoding="utf-8"))["input_ids"]
        half = min(len(ids) // 2, args.tokens)
        return windows(ids[:half]), windows(ids[len(ids) // 2 : len(ids) // 2 + half])

    base_fit, base_eval = halves("base")
    base_model = AutoModelForCausalLM.from_pretrained(ASSETS / "base", dtype=torch.float32).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tenant in TENANTS:
            ft_dir = ASSETS / "finetunes" / tenant
            if not ft_dir.is_dir():
                ft_dir = Path(tmp) / tenant
                merge_lora(ASSETS / "base", ASSETS / "lora" / tenant, ft_dir)
            ft = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).eval()
            ten_fit, ten_eval = halves(tenant)
            fit = [logits_and_targets(ft, base_fit), logits_and_targets(ft, ten_fit)]
            bias = fit_bias(fit, args.steps, args.lr)
            row = {"tenant": tenant, "fit_tokens": [len(t) for _, t in fit]}
            for domain, parts in (("base_domain", base_eval), ("tenant_domain", ten_eval)):
                lb, tb = logits_and_targets(base_model, parts)
                lf, tf = logits_and_targets(ft, parts)
                row[domain] = {"tokens": len(tb), "base": loss(lb, tb), "finetune": loss(lf, tf),
                               "calibrated": loss(lf, tf, bias)}  # fmt: skip
            b, t = row["base_domain"], row["tenant_domain"]
            row["base_loss_restored"] = (b["finetune"] - b["calibrated"]) / (b["finetune"] - b["base"])
            row["tenant_gain_kept"] = (t["base"] - t["calibrated"]) / (t["base"] - t["finetune"])
            rows.append(row)
    print("| tenant | base-domain loss: base / fine-tune / calibrated | restored | tenant-domain loss: base / "
          "fine-tune / calibrated | gain kept |")
    print("|---|---|---|---|---|")
    for r in rows:
        b, t = r["base_domain"], r["tenant_domain"]
        print(f"| {r['tenant']} | {b['base']:.3f} / {b['finetune']:.3f} / {b['calibrated']:.3f} | "
              f"{r['base_loss_restored']:.1%} | {t['base']:.3f} / {t['finetune']:.3f} / {t['calibrated']:.3f} | "
              f"{r['tenant_gain_kept']:.1%} |")
    date = dt.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"calibration-{date}.json"
    write_result({"date": date, "git_commit": git_commit(), "steps": args.steps, "lr": args.lr,
                  "tokens": args.tokens, "rows": rows}, out)  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""How well DIDR's Diffused Reward Proxy points along the reward, by noise level (docs/results.md, "DIDR").

For one-step student samples x, compares the proxy's reward term in x0 units,
σ²/(1 − σ)·∇_{x_t} r(D_k(x_t)) at x_t = (1 − σ)·x + σ·ε, with the reward's gradient on the clean
sample, ∇_x r(x): their cosine and the term's mean size, per σ and k.

    .venv/bin/python scripts/didr_proxy_cosine.py [--n 32] [--sigmas 0.05 0.2 0.4 0.6 0.8 0.95] [--k 1 4]
"""

from __future__ import annotations

import argparse

import torch

from diffrl.learner.algorithms.didr import diffused_reward_proxy, score_to_x0_units
from diffrl.models.adapter import FlowModel
from diffrl.models.differentiable_reward import load_differentiable_reward
from diffrl.models.shapes_world import train_prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="assets/shapes-student-1step")
    p.add_argument("--teacher", default="assets/shapes-base-3k")
    p.add_argument("--reward", default="assets/shapes-reward-cnn")
    p.add_argument("--n", type=int, default=32, help="samples (the first N training prompts, seeds 0..N-1)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    p.add_argument("--k", type=int, nargs="+", default=[1, 4], help="proxy Euler steps")
    args = p.parse_args()
    torch.manual_seed(0)
    student = FlowModel.from_pretrained(args.student, device="cpu")
    teacher = FlowModel.from_pretrained(args.teacher, device="cpu")
    reward = load_differentiable_reward(args.reward)
    prompts = train_prompts()[: args.n]
    cond, tcond = student.encode_prompts(prompts), teacher.encode_prompts(prompts)
    with torch.no_grad():
        z = student.initial_noise(list(range(args.n)))
        x = z - student.velocity(z, torch.ones(args.n), cond)
    x = x.requires_grad_(True)
    (clean,) = torch.autograd.grad(reward(student.decode_differentiable(x), prompts).sum(), x)
    x = x.detach()
    image_reward = lambda d: reward(teacher.decode_differentiable(d), prompts)
    velocity = lambda xx, ss: teacher.velocity(xx, ss, tcond)
    print("| σ | k | cosine with ∇_x r(x) | mean abs term |\n| --- | --- | --- | --- |")
    for s in args.sigmas:
        sigma = torch.full((args.n,), s)
        x_t = (1 - s) * x + s * torch.randn(x.shape)
        for k in args.k:
            grad, _ = diffused_reward_proxy(x_t, sigma, velocity, image_reward, k)
            term = score_to_x0_units(grad, sigma)
            cos = torch.nn.functional.cosine_similarity(term.flatten(1), clean.flatten(1), dim=1).mean()
            print(f"| {s} | {k} | {float(cos):.3f} | {float(term.abs().mean()):.2e} |")


if __name__ == "__main__":
    main()

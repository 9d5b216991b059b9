"""Gram rule for ``nn.Linear``.

With ``A`` (N x in) the layer's inputs over all calls and positions and ``D_t`` (N x out) task t's
gradient with respect to the layer's output, task t's weight gradient is ``D_t^T A`` and its bias
gradient ``D_t^T 1``. Two exact ways to the Gram, the cheaper chosen by counting flops:
- kernel: ``G[s,t] = <D_s, K D_t>`` with ``K = A A^T (+ 1 1^T for the bias)``, N x N;
- gradients: form the T weight gradients (in output-row blocks under the memory budget) and
  multiply them.
The weighted gradient ``(sum_t w_t D_t)^T A`` costs what a plain backward's weight gradient costs.
"""

from __future__ import annotations

import torch
from torch import nn

from gradlens.engines._base import accumulate_grad
from gradlens.engines.rules import register_rule

__all__: list[str] = []


@register_rule(nn.Linear, name="linear")
def linear_rule(
    module: nn.Module,
    inputs: list[torch.Tensor],
    out_grads: list[torch.Tensor],
    weights: torch.Tensor,
    params: list[torch.Tensor],
    budget: int,
) -> torch.Tensor:
    W, b = module.weight, module.bias
    has_w = any(p is W for p in params)
    has_b = b is not None and any(p is b for p in params)
    out_f, in_f = W.shape
    T = out_grads[0].shape[0]
    A = (
        torch.cat([x.reshape(-1, in_f) for x in inputs])
        if len(inputs) > 1
        else (inputs[0].reshape(-1, in_f))
    )
    D = torch.cat([d.reshape(T, -1, out_f) for d in out_grads], dim=1)
    N = A.shape[0]
    A = A.to(D.dtype)

    Dw = torch.tensordot(weights.to(D.dtype), D, dims=1)  # N x out
    if has_w:
        accumulate_grad(W, Dw.T @ A)
    if has_b:
        accumulate_grad(b, Dw.sum(0))

    itemsize = D.element_size()
    kernel_flops = (N * N * in_f if has_w else 0) + T * N * N * out_f + T * T * N * out_f
    grad_flops = T * N * out_f * in_f + T * T * out_f * in_f
    kernel_fits = N * N * itemsize <= budget
    if kernel_fits and (kernel_flops <= grad_flops or not has_w):
        K = A @ A.T if has_w else D.new_zeros(N, N)
        if has_b:
            K = K + 1.0
        KD = torch.matmul(K, D)  # T x N x out
        return (D.reshape(T, -1) @ KD.reshape(T, -1).T).to(torch.float64)

    G = torch.zeros(T, T, dtype=torch.float64, device=D.device)
    if has_b:
        gb = D.sum(1)  # T x out
        G += (gb @ gb.T).to(torch.float64)
    if has_w:
        rows = max(1, min(out_f, budget // max(1, T * in_f * itemsize)))
        Dt = D.transpose(1, 2)  # T x out x N
        for lo in range(0, out_f, rows):
            gW = torch.matmul(Dt[:, lo : lo + rows], A)  # T x rows x in
            g2 = gW.reshape(T, -1)
            G += (g2 @ g2.T).to(torch.float64)
    return G

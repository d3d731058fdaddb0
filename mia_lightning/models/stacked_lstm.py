"""One LSTM layer for K models at once: stacked weights, one time-step loop of batched matmuls.

``stacked_lstm(xp, w_hh)`` runs K independent LSTMs (PyTorch's equations and gate order i, f, g, o)
over their own batches. ``xp`` [K, T, B, 4H] is every step's input projection with both biases
already added (one ``baddbmm`` over all T x B tokens, outside the loop); inside the loop each step is
one ``baddbmm`` of the hidden states [K, B, H] by ``w_hh`` [K, H, 4H] plus the gate arithmetic.

The backward pass is written by hand rather than recorded by autograd: autograd would keep a graph
of about ten nodes per step and replay them one by one; here the loop runs only what the recurrence
needs (one ``bmm`` back through ``w_hh`` and the gate derivatives per step), and the weight
gradient is ONE ``bmm`` over all T x B steps after the loop. ``tests/test_lstm_ensemble.py``
checks values and gradients against ``nn.LSTM``.
"""

from __future__ import annotations

import torch


class _StackedLSTM(torch.autograd.Function):
    """Forward: hidden states [K, T, B, H] of every step; backward: gradients of ``xp`` and ``w_hh``.

    Whatever does not depend on the recurrence is computed for all steps at once, outside the loops
    (the gates' derivatives, d c_t / d h_t), so each step runs only a handful of elementwise ops.
    """

    @staticmethod
    def forward(ctx, xp: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        k, steps, batch, four_h = xp.shape
        hidden = four_h // 4
        candidate = slice(2 * hidden, 3 * hidden)
        gates = torch.empty_like(xp)  # activated gates i, f, g, o of every step
        cells = xp.new_empty(k, steps, batch, hidden)
        tanh_cells = torch.empty_like(cells)
        states = torch.empty_like(cells)
        h = xp.new_zeros(k, batch, hidden)
        c = xp.new_zeros(k, batch, hidden)
        for t in range(steps):
            pre = torch.baddbmm(xp[:, t], h, w_hh)
            act = gates[:, t]
            torch.sigmoid(pre, out=act)
            torch.tanh(pre[..., candidate], out=act[..., candidate])
            i, f, g, o = act.chunk(4, dim=-1)
            c = torch.addcmul(f * c, i, g, out=cells[:, t])
            h = torch.mul(o, torch.tanh(c, out=tanh_cells[:, t]), out=states[:, t])
        ctx.save_for_backward(w_hh, gates, cells, tanh_cells, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        w_hh, gates, cells, tanh_cells, states = ctx.saved_tensors
        k, steps, batch, hidden = states.shape
        candidate = slice(2 * hidden, 3 * hidden)
        derivative = gates * (1 - gates)  # d activation / d pre-activation: sigmoid' for i, f, o ...
        torch.mul(gates[..., candidate], gates[..., candidate], out=derivative[..., candidate]).neg_().add_(1)  # ... tanh' for g
        dc_dh = gates[..., 3 * hidden :] * (1 - tanh_cells * tanh_cells)  # d c_t / d h_t through h_t = o_t tanh(c_t)
        previous_cells = torch.cat([cells.new_zeros(k, 1, batch, hidden), cells[:, :-1]], dim=1)
        grad_gates = torch.empty_like(gates)  # d loss / d pre-activation gates = d loss / d xp
        w_hh_t = w_hh.transpose(1, 2)
        dh = grad_states.new_zeros(k, batch, hidden)
        dc = grad_states.new_zeros(k, batch, hidden)
        for t in range(steps - 1, -1, -1):
            i, f, g, o = gates[:, t].chunk(4, dim=-1)
            di, df, dg, do = grad_gates[:, t].chunk(4, dim=-1)
            dh = dh + grad_states[:, t]
            dc = torch.addcmul(dc, dh, dc_dh[:, t])
            torch.mul(dc, g, out=di)
            torch.mul(dc, previous_cells[:, t], out=df)
            torch.mul(dc, i, out=dg)
            torch.mul(dh, tanh_cells[:, t], out=do)
            grad_gates[:, t].mul_(derivative[:, t])
            dc = dc * f
            dh = torch.bmm(grad_gates[:, t], w_hh_t)
        previous = torch.cat([states.new_zeros(k, 1, batch, hidden), states[:, :-1]], dim=1)
        grad_w_hh = torch.bmm(previous.reshape(k, steps * batch, hidden).transpose(1, 2), grad_gates.reshape(k, steps * batch, 4 * hidden))
        return grad_gates, grad_w_hh


def stacked_lstm(xp: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:
    """Hidden states [K, T, B, H] of K LSTMs from input projections ``xp`` [K, T, B, 4H] (biases included) and ``w_hh`` [K, H, 4H]; zero initial state.

    Under mixed precision the recurrence still runs in float32 (as cuDNN keeps its cell state):
    half-precision states drift over long sequences.
    """
    if xp.dtype in (torch.float16, torch.bfloat16) or w_hh.dtype in (torch.float16, torch.bfloat16):
        xp, w_hh = xp.float(), w_hh.float()
    with torch.autocast(xp.device.type, enabled=False):
        return _StackedLSTM.apply(xp, w_hh)

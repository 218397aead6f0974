#!/usr/bin/env python3
"""grun's TORCH_LIBRARY ops (examples/torch_ops) against a pure-PyTorch reference of the math.

    python3 test_torch_ops.py path/to/libgrun_torch_ops.so

Exit 77 (ctest's SKIP_RETURN_CODE) when this python cannot import torch or load the library
(a libtorch / python-torch version mismatch, say). The reference below is written from the
formulas in DESIGN.md, independently of grun's code:

    h' = h with rows + g(h) Δ(h)                  (stack: h + s Σ_k g_k Δ_k)
    linear  g = σ(wᵀh + c)          mlp  g = σ(w3ᵀ relu(W2 relu(W1 h + b1) + b2) + b3)   always  g = 1
    loreft/noreft  Δ = Rᵀ(W h + b − R h)           direft  Δ = W2ᵀ(W1 h + b)
    nll_t = logsumexp(x_t) − x_t[y_t]  (0 where y_t = −100)

Flat layout: the gate's fields then the reft's fields, each row-major, in the order listed in LAYOUT.
"""
import sys
import unittest

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001
    print(f"SKIPPED: cannot import torch in {sys.executable}: {e}")
    sys.exit(77)

H1, H2 = 256, 64  # gate::mlp<> widths


def layout(gate, reft, r, d):
    """[(name, shape)] in flat order."""
    g = {"linear": [("gate.weight", (1, d)), ("gate.bias", (1,))],
         "mlp": [("gate.w1", (H1, d)), ("gate.b1", (H1,)), ("gate.w2", (H2, H1)), ("gate.b2", (H2,)),
                 ("gate.w3", (1, H2)), ("gate.b3", (1,))],
         "always": []}[gate]
    return g + [("reft.rotate_layer", (r, d)), ("reft.weight", (r, d)), ("reft.bias", (r,))]


def carve(flat, gate, reft, r, d):
    out, off = {}, 0
    for name, shape in layout(gate, reft, r, d):
        n = 1
        for s in shape:
            n *= s
        out[name] = flat[off:off + n].view(shape)
        off += n
    assert off == flat.numel(), (off, flat.numel())
    return out


def ref_gate(p, gate, x):  # x [P, d] -> [P]
    if gate == "always":
        return torch.ones(x.shape[0], dtype=x.dtype)
    if gate == "linear":
        return torch.sigmoid(x @ p["gate.weight"][0] + p["gate.bias"][0])
    a1 = torch.relu(x @ p["gate.w1"].t() + p["gate.b1"])
    a2 = torch.relu(a1 @ p["gate.w2"].t() + p["gate.b2"])
    return torch.sigmoid(a2 @ p["gate.w3"][0] + p["gate.b3"][0])


def relu_margin(flat, x, reft, r, d):
    """Smallest |pre-activation| of the mlp gate's ReLUs over rows x (finite differences need it > eps)."""
    p = carve(flat, "mlp", reft, r, d)
    z1 = x @ p["gate.w1"].t() + p["gate.b1"]
    z2 = torch.relu(z1) @ p["gate.w2"].t() + p["gate.b2"]
    return min(z1.abs().min().item(), z2.abs().min().item())


def ref_delta(p, reft, x):  # x [P, d] -> [P, d]
    R, W, b = p["reft.rotate_layer"], p["reft.weight"], p["reft.bias"]
    if reft == "direft":
        return (x @ W.t() + b) @ R
    return (x @ W.t() + b - x @ R.t()) @ R


def ref_stack(h, flats, rows, gate, reft, r, scale):
    d = h.shape[-1]
    x = h.reshape(-1, d)
    sel = x[rows]
    gates, acc = [], torch.zeros_like(sel)
    for flat in flats:
        p = carve(flat, gate, reft, r, d)
        g = ref_gate(p, gate, sel)
        acc = acc + g[:, None] * ref_delta(p, reft, sel)
        gates.append(g)
    out = x.index_copy(0, rows, sel + scale * acc)
    return out.view(h.shape), torch.stack(gates)


def ref_intervention(h, flat, rows, gate, reft, r):
    y, g = ref_stack(h, [flat], rows, gate, reft, r, 1.0)
    return y, g[0]


CASES = [("linear", "loreft", 4), ("mlp", "loreft", 2), ("always", "loreft", 1), ("linear", "direft", 4),
         ("mlp", "direft", 1), ("linear", "noreft", 2), ("always", "direft", 8)]


class TorchOps(unittest.TestCase):
    ops = None

    def params(self, gate, reft, r, d, seed, dtype=torch.float64):
        flat = self.ops.init_params(gate, reft, r, d, seed, dtype)
        g = torch.Generator().manual_seed(seed)
        # move off the initialization (gate ≈ 0.5, b = 0) so every path carries signal
        return (flat + 0.3 * torch.randn(flat.shape, generator=g, dtype=dtype)).detach()

    def test_layout_and_init(self):
        for gate, reft, r in CASES:
            d = 6
            n = sum(torch.Size(s).numel() for _, s in layout(gate, reft, r, d))
            self.assertEqual(self.ops.param_count(gate, reft, r, d), n)
            flat = self.ops.init_params(gate, reft, r, d, 3, torch.float64)
            self.assertEqual(flat.numel(), n)
            if reft == "loreft":
                R = carve(flat, gate, reft, r, d)["reft.rotate_layer"]
                self.assertLess((R @ R.t() - torch.eye(r, dtype=R.dtype)).abs().max().item(), 1e-12)
        self.assertTrue(torch.equal(self.ops.init_params("mlp", "loreft", 4, 8, 5, None),
                                    self.ops.init_params("mlp", "loreft", 4, 8, 5, torch.float32)))

    def test_intervention_values(self):
        for gate, reft, r in CASES:
            for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
                d = 10
                flat = self.params(gate, reft, r, d, 1, dtype)
                h = torch.randn(2, 4, d, dtype=dtype)
                rows = torch.tensor([7, 0, 3], dtype=torch.long)
                y, g = self.ops.gated_intervention(h, flat, rows, gate, reft, r)
                yr, gr = ref_intervention(h, flat, rows, gate, reft, r)
                self.assertEqual(y.shape, h.shape)
                self.assertLess((y - yr).abs().max().item(), tol, (gate, reft, r, dtype))
                self.assertLess((g - gr).abs().max().item(), tol, (gate, reft, r, dtype))
                untouched = [i for i in range(8) if i not in (7, 0, 3)]
                self.assertTrue(torch.equal(y.reshape(8, d)[untouched], h.reshape(8, d)[untouched]))

    def test_intervention_gradcheck(self):
        for gate, reft, r in CASES:
            d = 5
            flat = self.params(gate, reft, r, d, 2).requires_grad_()
            rows = torch.tensor([4, 1, 5], dtype=torch.long)
            h = torch.randn(6, d, dtype=torch.float64, requires_grad=True)
            while gate == "mlp" and relu_margin(flat.detach(), h.detach()[rows], reft, r, d) < 1e-4:
                h = torch.randn(6, d, dtype=torch.float64, requires_grad=True)  # keep eps away from ReLU kinks
            fn = lambda h_, f_: self.ops.gated_intervention(h_, f_, rows, gate, reft, r)  # noqa: E731
            self.assertTrue(torch.autograd.gradcheck(fn, (h, flat), eps=1e-6, atol=1e-7, rtol=1e-6), (gate, reft, r))
            # and the analytical gradient equals the reference's autograd
            wy, wg = torch.randn(6, d, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
            y, g = fn(h, flat)
            ga = torch.autograd.grad((y * wy).sum() + (g * wg).sum(), (h, flat))
            yr, gr = ref_intervention(h, flat, rows, gate, reft, r)
            gb = torch.autograd.grad((yr * wy).sum() + (gr * wg).sum(), (h, flat))
            for a, b in zip(ga, gb):
                self.assertLess((a - b).abs().max().item(), 1e-10, (gate, reft, r))

    def test_stack(self):
        for gate, reft, r in (("linear", "loreft", 2), ("mlp", "direft", 1)):
            d = 5
            f0, f1 = self.params(gate, reft, r, d, 3), self.params(gate, reft, r, d, 4)
            f2 = self.params(gate, reft, r, d, 5).requires_grad_()
            frozen = torch.stack([f0, f1])
            h = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
            rows = torch.tensor([5, 2], dtype=torch.long)
            scale = 0.6 * 3 + 0.6
            y, g = self.ops.intervention_stack(h, frozen, f2, rows, gate, reft, r, scale)
            yr, gr = ref_stack(h, [f0, f1, f2], rows, gate, reft, r, scale)
            self.assertEqual(tuple(g.shape), (3, 2))
            self.assertLess((y - yr).abs().max().item(), 1e-12)
            self.assertLess((g - gr).abs().max().item(), 1e-12)
            fn = lambda h_, f_: self.ops.intervention_stack(h_, frozen, f_, rows, gate, reft, r, scale)  # noqa: E731
            if gate == "mlp":  # keep finite differences away from the ReLU kinks of every module
                while min(relu_margin(f, h.detach().reshape(-1, d)[rows], reft, r, d) for f in (f0, f1, f2)) < 1e-4:
                    h = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
            self.assertTrue(torch.autograd.gradcheck(fn, (h, f2), eps=1e-6, atol=1e-7, rtol=1e-6))
            # no trainable module: an empty flat
            y0, g0 = self.ops.intervention_stack(h, frozen, torch.empty(0, dtype=torch.float64), rows, gate, reft, r,
                                                 1.0)
            yr0, gr0 = ref_stack(h, [f0, f1], rows, gate, reft, r, 1.0)
            self.assertLess((y0 - yr0).abs().max().item(), 1e-12)
            self.assertTrue(torch.autograd.gradcheck(
                lambda h_: self.ops.intervention_stack(h_, frozen, torch.empty(0, dtype=torch.float64), rows, gate,
                                                       reft, r, 1.0), (h,), eps=1e-6, atol=1e-7, rtol=1e-6))

    def test_token_nll(self):
        logits = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 12, -100, 5, 5, -100, 3], dtype=torch.long)
        nll = self.ops.token_nll(logits, labels)
        ref = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
        self.assertLess((nll - ref).abs().max().item(), 1e-12)
        self.assertTrue(torch.autograd.gradcheck(lambda x: self.ops.token_nll(x, labels), (logits,), eps=1e-6,
                                                 atol=1e-7, rtol=1e-6))
        big = (logits.detach() * 1e3 + 1e4).float()  # online log-sum-exp: no overflow
        self.assertLess((self.ops.token_nll(big, labels).double()
                         - F.cross_entropy(big.double(), labels, reduction="none")).abs().max().item(), 1e-2)

    def test_retract(self):
        flat = self.params("linear", "loreft", 4, 9, 6)  # perturbed: R no longer orthonormal
        self.ops.retract_(flat, "linear", "loreft", 4, 9)
        R = carve(flat, "linear", "loreft", 4, 9)["reft.rotate_layer"]
        self.assertLess((R @ R.t() - torch.eye(4, dtype=R.dtype)).abs().max().item(), 1e-12)

    def test_training_step_reduces_loss(self):
        gate, reft, r, d = "mlp", "loreft", 4, 8
        flat = self.ops.init_params(gate, reft, r, d, 7, torch.float32).requires_grad_()
        h = torch.cat([torch.randn(8, d) + 1, torch.randn(8, d) - 1])
        label = torch.cat([torch.ones(8), torch.zeros(8)])
        rows = torch.arange(16)
        opt = torch.optim.AdamW([flat], lr=1e-2)
        losses = []
        for _ in range(40):
            opt.zero_grad()
            _, g = self.ops.gated_intervention(h, flat, rows, gate, reft, r)
            loss = F.binary_cross_entropy(g, label)
            loss.backward()
            opt.step()
            with torch.no_grad():
                self.ops.retract_(flat, gate, reft, r, d)
            losses.append(loss.item())
        self.assertLess(losses[-1], 0.5 * losses[0])

    def test_bad_input(self):
        flat = self.params("linear", "loreft", 2, 4, 1)
        h = torch.randn(3, 4, dtype=torch.float64)
        with self.assertRaisesRegex(RuntimeError, r"expected a row in \[0, 3\)"):
            self.ops.gated_intervention(h, flat, torch.tensor([3]), "linear", "loreft", 2)
        with self.assertRaisesRegex(RuntimeError, "expected dtype Long"):
            self.ops.gated_intervention(h, flat, torch.tensor([0], dtype=torch.int32), "linear", "loreft", 2)
        with self.assertRaisesRegex(RuntimeError, "gate kind \"relu\" unknown"):
            self.ops.gated_intervention(h, flat, torch.tensor([0]), "relu", "loreft", 2)
        with self.assertRaisesRegex(RuntimeError, "rank 3 is not instantiated"):
            self.ops.gated_intervention(h, flat, torch.tensor([0]), "linear", "loreft", 3)
        with self.assertRaisesRegex(RuntimeError, "expected 41 parameters"):
            self.ops.gated_intervention(h, flat, torch.tensor([0]), "linear", "loreft", 4)
        with self.assertRaisesRegex(RuntimeError, "expected the dtype of h"):
            self.ops.gated_intervention(h.float(), flat, torch.tensor([0]), "linear", "loreft", 2)
        with self.assertRaisesRegex(RuntimeError, "outside the vocabulary"):
            self.ops.token_nll(torch.randn(2, 3), torch.tensor([0, 3]))


def main():
    if len(sys.argv) < 2:
        print("usage: test_torch_ops.py path/to/libgrun_torch_ops.so [unittest args]")
        return 2
    try:
        torch.ops.load_library(sys.argv[1])
    except Exception as e:  # noqa: BLE001
        print(f"SKIPPED: cannot load {sys.argv[1]} into torch {torch.__version__}: {e}")
        return 77
    print(f"torch {torch.__version__} from {torch.__file__}")
    TorchOps.ops = torch.ops.grun
    torch.manual_seed(0)
    prog = unittest.main(argv=[sys.argv[0]] + sys.argv[2:], exit=False, verbosity=2)
    return 0 if prog.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())

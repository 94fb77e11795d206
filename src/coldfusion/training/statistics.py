"""Statistics a contributor computes on its own data for Fisher and RegMean fusion.

Both touch private data, so only the contributor can compute them; it sends them with
its body. Keys are body tensor names, so the repository can fuse them name by name.
"""

import torch

from coldfusion.io.checkpoint import Tensors
from coldfusion.models.encoder import Classifier
from coldfusion.training.batching import Encoded, collate, device_of, length_bucketed_batches


def diagonal_fisher(model: Classifier, data: Encoded, num_examples: int = 128, seed: int = 0) -> Tensors:
    """Mean squared gradient of log p(y|x) over examples, y sampled from the model's own prediction.

    Sampling y from p(.|x) (rather than using the gold label) makes this an unbiased
    estimate of the true Fisher, as in Fisher merging (Matena & Raffel, 2022).
    """
    g = torch.Generator().manual_seed(seed)
    model.eval()  # no dropout: the Fisher of the deterministic model
    params = dict(model.body.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    n = min(num_examples, len(data))
    device = device_of(model)
    for i in range(n):
        batch = collate(data, [i], device)
        log_probs = torch.log_softmax(model(**batch), dim=-1)[0]
        y = torch.multinomial(log_probs.detach().float().cpu().exp(), 1, generator=g).item()
        model.zero_grad(set_to_none=True)
        log_probs[y].backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name].add_(p.grad.detach() ** 2)
    model.zero_grad(set_to_none=True)
    state_names = {id(t): k for k, t in model.body.state_dict(keep_vars=True).items()}
    return {state_names[id(params[name])]: (f / n).cpu() for name, f in fisher.items()}


@torch.inference_mode()
def gram_matrices(model: Classifier, data: Encoded, num_examples: int = 256, batch_size: int = 32) -> Tensors:
    """G = X^T X of the inputs of every linear layer of the body, over non-padding tokens.

    Keyed by the layer's weight name ("encoder.layer.0.attention.self.query.weight").
    """
    model.eval()
    grams: Tensors = {}
    mask_now: list[torch.Tensor] = []  # the current batch's attention mask, for the hooks

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0]
            if x.dim() == 3:  # (batch, tokens, features): keep real tokens only
                x = x[mask_now[0].bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return accumulate

    handles = [m.register_forward_hook(hook(f"{name}.weight"))
               for name, m in model.body.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        subset = data.take(range(min(num_examples, len(data))))
        device = device_of(model)
        for idx in length_bucketed_batches(subset.lengths, batch_size, rng=None):
            batch = collate(subset, idx, device)
            mask_now[:] = [batch["attention_mask"]]
            model.embed(**batch)
    finally:
        for h in handles:
            h.remove()
    return {k: v.float().cpu() for k, v in grams.items()}

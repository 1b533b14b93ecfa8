"""Packed rows for the causal-LM loss: a right-padded batch laid out as a few long rows.

Each packed row holds the leading tokens all the batch's rows share (a fixed system prompt: 15
of the ~34 tokens of a built-in G2P example) once instead of once per row, then the rest of each
row, without padding, with an attention mask that keeps the rows apart. On CPU a matmul's time
follows its rows, and every extra pass over the weights costs about a full one, so packing into
one pass is what pays (a separate prefix pass with a repeated key/value cache did not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Packed rows hold up to this many tokens: attention over a packed row costs its length squared,
# so several shorter rows beat one long one past a few hundred tokens.
PACK_TOKENS = 256


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor) -> int:
    """Length P of the leading tokens every row has in common (unpadded), cut so that no
    position before P predicts a label and at least one token of each row is left after it."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    p = int(same.long().cumprod(0).sum())
    predicting = sel.any(0).nonzero()
    first = int(predicting[0]) if len(predicting) else 0
    return min(p, first, int(attention_mask.sum(1).min()) - 1)


def packable(model, length: int) -> bool:
    """True when the decoder takes a packed row with a custom 4-D mask and gets every position from
    ``position_ids``: rotary models (Llama, Mistral, Qwen, Gemma, ...) under SDPA or eager attention,
    and no sliding window shorter than the batch (the custom mask replaces the window's mask)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(cfg, "sliding_window", None)
    return hasattr(model.get_decoder(), "rotary_emb") and (not window or window >= length)


@dataclass
class Packed:
    input_ids: torch.Tensor  # (G, N)
    position_ids: torch.Tensor  # (G, N)
    allowed: torch.Tensor  # (G, 1, N, N) bool, True where query (row) may attend key (column)
    index: torch.Tensor  # (B, T): flat index into G * N of each real token of the padded batch


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, sel: torch.Tensor,
          max_tokens: int | None = None) -> Packed | None:
    """Lay a right-padded batch out as G packed rows of at most ``max_tokens`` tokens (longer rows alone).

    Each packed row holds the batch's common prefix once, then the rest of each of its rows, padding
    dropped; the mask lets every token see the prefix and the earlier tokens of its own row, so each
    token's output is what the padded batch gives it. A row's tokens after its last label-predicting
    position are left out too (a row's last token, at least): no scored position attends to them.
    Returns None when packing saves no tokens or the batch is not right-padded.
    """
    max_tokens = PACK_TOKENS if max_tokens is None else max_tokens  # read at call time
    device = input_ids.device
    input_ids, attention_mask, sel = input_ids.cpu(), attention_mask.cpu(), sel.cpu()  # laid out on the host
    B, T = input_ids.shape
    lens = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(T) < lens[:, None]):
        return None
    P = max(0, shared_prefix_len(input_ids, attention_mask, sel))
    last = torch.where(sel, torch.arange(T - 1), -1).amax(1)  # each row's last label-predicting position
    need = torch.minimum((last + 1).clamp(min=P), lens)  # the tokens each row needs
    groups, sizes = [[]], [P]  # batch rows of each packed row, and its token count
    for b, n in enumerate((need - P).tolist()):
        if groups[-1] and sizes[-1] + n > max_tokens:
            groups.append([])
            sizes.append(P)
        groups[-1].append(b)
        sizes[-1] += n
    G, N = len(groups), max(sizes)
    if G * N >= B * T:
        return None
    ids = input_ids.new_zeros((G, N))
    pos = torch.zeros((G, N), dtype=torch.long)
    seg = torch.full((G, N), -2)  # -1: the shared prefix, b: batch row b, -2: padding
    index = torch.zeros((B, T), dtype=torch.long)
    for g, rows in enumerate(groups):
        ids[g, :P], pos[g, :P], seg[g, :P] = input_ids[rows[0], :P], torch.arange(P), -1
        o = P
        for b in rows:
            L = int(need[b])
            dst = slice(o, o + L - P)  # row b's tokens after the prefix
            ids[g, dst], pos[g, dst], seg[g, dst] = input_ids[b, P:L], torch.arange(P, L), b
            index[b, :P] = g * N + torch.arange(P)
            index[b, P:L] = g * N + torch.arange(dst.start, dst.stop)
            o = dst.stop
    q, k = seg[:, :, None], seg[:, None, :]
    # padding keys match only padding queries, which then see one another: no softmax row is empty
    allowed = (pos[:, None, :] <= pos[:, :, None]) & ((k == -1) | (k == q))
    return Packed(ids.to(device), pos.to(device), allowed[:, None].to(device), index.to(device))


def packed_hidden(model, packed: Packed) -> torch.Tensor:
    """Decoder output (G * N, H) of the packed rows."""
    mask = packed.allowed
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    out = model.get_decoder()(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                              use_cache=False)
    return out.last_hidden_state.flatten(0, 1)

"""torch.bernoulli's CPU draws, reproduced with NumPy's MT19937: the same bits and the same generator state after.

`torch.bernoulli(p, generator=g)` with a float32 tensor `p` draws serially, one 32-bit MT19937 output x per entry:
the entry is `(x & 0xFFFFFF) · 2⁻²⁴ < p` (at::bernoulli_distribution<float> over at::uniform_real_distribution).
That loop runs at ~13 ns an entry; DARE draws one per weight entry per adapter (300 ms for two 5632×2048 masks).
NumPy's MT19937 is the same generator, so from the torch generator's state it gives the same outputs, ~10× faster;
the torch generator is then set to the state those draws leave, as if torch had drawn them. `bernoulli_masks` is
tested equal to torch.bernoulli's masks and end state; where the state is not the layout read here, it falls
back to torch.bernoulli itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch

STATE_BYTES = 5056  # CPUGeneratorImplStateLegacy: THGeneratorState (seed, left, seeded, next, 624 words, normals) + float + bool
KEY_OFFSET, N = 24, 624
CHUNK = 1 << 20  # draws per NumPy call (8 MB of uint64 at a time)


def _numpy_mt(state: np.ndarray) -> np.random.MT19937 | None:
    """A NumPy MT19937 at the position of a torch CPU generator's state bytes, or None if they do not parse."""
    if state.size != STATE_BYTES:
        return None
    left = int(state[8:12].view(np.int32)[0])
    nxt = int(state[16:24].view(np.uint64)[0])
    words = state[KEY_OFFSET:KEY_OFFSET + 8 * N].view(np.uint64)
    if not 1 <= left <= N or (left > 1 and nxt != N + 1 - left) or words.max() >= 2**32:
        return None
    mt = np.random.MT19937()
    # torch draws when --left reaches 0 (then regenerates); NumPy regenerates when pos reaches 624
    mt.state = {"bit_generator": "MT19937", "state": {"key": words.astype(np.uint32), "pos": N + 1 - left}}
    return mt


def _torch_state(state: np.ndarray, mt: np.random.MT19937) -> torch.Tensor:
    """`state` (torch's bytes) moved to the NumPy generator's position."""
    out = state.copy()
    st = mt.state["state"]
    pos = int(st["pos"])
    out[8:12].view(np.int32)[0] = N + 1 - pos
    out[16:24].view(np.uint64)[0] = pos
    out[KEY_OFFSET:KEY_OFFSET + 8 * N].view(np.uint64)[:] = st["key"].astype(np.uint64)
    return torch.from_numpy(out)


def bernoulli_masks(shape: tuple[int, ...], count: int, p: float, generator: torch.Generator | None) -> list[torch.Tensor]:
    """`count` bool masks of `shape`, each `torch.bernoulli(full(shape, p, float32), generator=generator)`, drawn
    one after the other: the same masks, and the generator (torch's default when None) left in the same state."""
    gen = generator if generator is not None else torch.default_generator
    state = gen.get_state().numpy()
    mt = _numpy_mt(state) if gen.device.type == "cpu" else None
    if mt is None:
        full = torch.tensor(p, dtype=torch.float32).expand(*shape)
        return [torch.bernoulli(full, generator=generator, out=torch.empty(*shape, dtype=torch.bool)) for _ in range(count)]
    # u = m·2⁻²⁴ (m the low 24 bits, exact in float32) < p  ⟺  m < ceil(p·2²⁴) for an integer m
    cut = np.uint64(max(0, min(math.ceil(float(np.float32(p)) * 2.0**24), 2**24)))
    masks = []
    for _ in range(count):
        out = np.empty(int(np.prod(shape)), dtype=np.bool_)
        for start in range(0, out.size, CHUNK):
            raw = mt.random_raw(min(CHUNK, out.size - start))
            raw &= 0xFFFFFF
            np.less(raw, cut, out=out[start:start + raw.size])
        masks.append(torch.from_numpy(out).view(*shape))
    gen.set_state(_torch_state(state, mt))
    return masks

"""ECALP (Li et al., ICLR 2025, "Efficient and Context-Aware Label Propagation"): zero-shot label propagation
over a graph of the class texts and every test sample seen so far, grown by one node per sample.

Read from the authors' code, Yushu-Li/ECALP @ 96ddf0b (MIT). The method is unchanged since the initial commit
81657ca; 96ddf0b adds few-shot result tables only. The zero-shot path is `main.py:main` (mode ZS) and
`utils/iterative_label_propagation.py` (u.i.l.p. below); the few-shot branches are not used.

- Inputs: the text features T [C, D] and one feature x_i per test sample, in stream order.
  - T is `zero_shot.classifier(text, templates)`. The authors load pre-extracted DMN text features; DMN
    ensembles templates and CuPL descriptions.
  - `main.py` feeds X = [x_0 .. x_i, x_i]: every sample so far, then sample i again as the *query node*. The
    query node lives for one sample; x_i stays as a persistent node. So N = i + 2 nodes at sample i.
  - `Config.view` picks x_i. "original" is view 0. "mean" is the *unnormalised* mean of all views, the
    authors' branch for 3-D feature files (u.i.l.p.:iterative_label_propagation, `image_features.mean(dim=1)`).
- Context-aware edge weights (u.i.l.p.:edge_reweighting, force_1=True):
  - w = normalise(var_c(T)), the per-dimension variance over the classes (unbiased), L2-normalised.
  - S(a, b) = normalise(x_a * w) . normalise(x_b).
- Image-image edges (u.i.l.p.:dynamic_graph_expansion). Each node keeps its k = min(8, N) strongest
  neighbours, itself included. The weighted side of S is always the *older* node: a node's row holds
  S(b, itself) for each node b that was there when it was added, and S(itself, n) for each node n added later.
  - First sample (N = 2): the full 2 x 2 S, top-k per row.
  - Later samples, incrementally:
    - The two new nodes (x_i and its query copy) take the top-k of S(b, x_i) over all N nodes.
    - Every older row keeps a store of candidates wider than k. Entries pointing at the previous query copy
      (whose index the new persistent node now takes) are set to -1. The new node and the new query copy
      join as two candidates, and the row keeps its top k_new:
      - k_new = k + 1 when the older rows number k + 1;
      - k_new = k + 2 when they are more than k;
      - otherwise k_new = k.
    - A row's edges are the first k of its store. The new rows' store is their top-k_new (top-k while the
      graph is small).
- Image-text edges: each node's top min(3, C) classes by the raw dot product x . T_c. They are computed once
  per node, when it is added.
- Graph (u.i.l.p.:iterative_label_propagation, knn_to_weighted_adj_matrix):
  - Every edge weight is raised to gamma = 10, and W holds them with the C text nodes first.
  - W <- W + W^T, D = diag(1 / (sqrt(row sums) + 1e-6)), W~ = D W D.
- Labels: the text nodes are clamped to the identity rows, Y_txt = I_C. Y_0 holds one entry per image node:
  its top score from the previous sample's propagation, divided by 5, at that score's class. The new node
  and the query copy start at 0, and the previous query copy's row is dropped.
- Propagation, 3 iterations: Y <- alpha * W~[image rows] @ [Y_txt; Y] + (1 - alpha) * Y_0, with alpha = 1.
  Afterwards Y_0 <- (top-1 value / 5) at the top-1 class, for every image node.
- Output: softmax(10000 * Y[query copy]); pred = argmax. The prediction of sample i therefore reads the whole
  stream 0..i, and every earlier node's label estimate is re-propagated at every sample.
- Constants: argparse of `main.py` (k_text 3, k_image 8, gamma 10, alpha 1, num_iterations 3) and literals in
  u.i.l.p. (/5, *10000, 1e-6, -1.0). They are the same for every dataset: the paper's claim is that ECALP
  needs no per-task search.

Paper, code and tta-vlm:
- The paper's text beyond its abstract was not available here. The abstract promises a dynamic graph over
  text prompts and test samples, context-aware re-weighting, and efficient expansion for inductive
  inference; the code does all three.
- Unresolved: which view features fill the authors' pre-extracted files. The files are on Google Drive, and
  DMN's repository has no extraction script. Their loader averages a 3-D [N, views, D] file, so both readings
  are offered. "original" is the default: the 2-D path, and tta-vlm's.
- tta-vlm (TomSheng21/tta-vlm @ bcc735f, online_method/ecalp.py + ecalp_utils.py) runs the authors' functions
  unchanged, apart from casting the similarities to fp32. It feeds view 0 of each sample and the model's
  single-prompt text features. Nothing to choose between.
- The text edge weight is the *signed* raw dot product x . T_c, raised to gamma = 10 with the rest. On OpenAI
  CLIP, image-text cosines are about 0.2-0.35 and positive, so the weights rank as the dot products do. Where a
  node's top-3 text edges include negative dot products, the even power can make the most negative one its
  heaviest edge, and the node seeds a class other than its zero-shot top-1. This is the authors' algorithm, kept
  as is (issue 27: on the bundled model's pixelate-5 the authors' code gives the same 300 of 300 predictions).
  `diagnostics.ecalp_text_edges` measures it per stream.
- fp32 throughout, as tta-vlm. torch.topk breaks ties as the authors' call does, but on the device at hand.
  The new node and its query copy always tie, so a row near its k-th neighbour may keep either; on the same
  device the choice is reproducible.
- Storage: every per-node array is preallocated on the device of T, for the whole stream when
  `start_stream(n)` gives its length (else it doubles as needed). That covers both feature banks, the
  candidate stores (width k + 2), the text edges and Y_0 as (value, class). The per-sample work is the
  authors': O(N) new similarities, O(N k) candidate updates, and 3 sparse products over the (C + N)-node graph.
  Y_0 is kept as one (value, class) pair per node and scattered into the dense [N, C] label matrix only for
  the propagation. The only host reads per sample are the outcome's scalars, in one transfer at the end.
  Coalescing the sparse graph (which sums W + W^T deterministically) synchronises inside torch on CUDA.

Records:
- Each sample's persistent node gets the next integer id (its stream position since `reset()`), listed in
  `appended`. The graph never removes a sample node, so `deleted` is always empty. The query copy is
  temporary and not recorded.
- `buffer_size`: the number of persistent sample nodes after the sample (the C text nodes and the query copy
  not counted). `selected` is empty.
- `entropy_before`: H(softmax(scale * x_i . T)), CLIP's zero-shot prediction on the node's feature.
  `entropy_after`: H of the authors' output softmax(10000 * scores). It is near 0 whenever the top two
  propagated scores differ by more than ~1e-3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..objectives import TuningConfig, entropy
from ..records import Outcome
from ..text import PromptTextEncoder
from .zero_shot import classifier

VIEWS = ("original", "mean")
INITIAL_NODES = 256  # preallocated nodes when the stream length is not given (an implementation choice)


@dataclass(frozen=True)
class Config:
    """ECALP's constants, the same on every dataset (Yushu-Li/ECALP main.py argparse, u.i.l.p. literals)."""

    view: str = "original"  # x_i: original = view 0 | mean = unnormalised mean of all views (3-D feature files)
    k_image: int = 8  # image-image neighbours per node (main.py --k_image)
    k_text: int = 3  # image-text neighbours per node (main.py --k_text)
    gamma: float = 10.0  # every edge weight is raised to gamma (main.py --gamma)
    alpha: float = 1.0  # Y <- alpha W~ Y + (1 - alpha) Y_0 (main.py --alpha)
    iterations: int = 3  # propagation steps per sample (main.py --num_iterations)
    carry_divisor: float = 5.0  # Y_0 = top-1 score / 5 (u.i.l.p.:iterative_label_propagation, `top3_values/5`)
    output_scale: float = 10000.0  # output softmax(10000 * scores) (u.i.l.p.:iterative_label_propagation)
    degree_eps: float = 1e-6  # D = 1 / (sqrt(row sum) + 1e-6) (u.i.l.p.:iterative_label_propagation)
    stale_similarity: float = -1.0  # store entries of the old query copy (u.i.l.p.:dynamic_graph_expansion)

    def __post_init__(self):
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.k_image < 1 or self.k_text < 1 or self.iterations < 1:
            raise ValueError("k_image, k_text and iterations must be >= 1")


def node_feature(view_features: torch.Tensor, view: str) -> torch.Tensor:
    """x_i from a sample's views [..., V, E]: view 0 ("original") or their unnormalised mean ("mean")."""
    if view == "original":
        return view_features[..., 0, :].float()
    return view_features.float().mean(-2)


def store_width(n_old: int, k: int) -> int:
    """How many candidates each older row keeps (u.i.l.p.:dynamic_graph_expansion, `k_im_new`)."""
    if n_old == k + 1:
        return k + 1
    if n_old > k:
        return k + 2
    return k


class ECALP:
    """Per sample: add its node (and a query copy), extend the kNN graph, propagate labels, read the query copy."""

    Config = Config
    order_independent = False
    uses_templates = True
    # the per-node arrays, each [capacity, ...] on the device of the text features
    ARRAYS = ("weighted", "unit", "store_sim", "store_knn", "text_sim", "text_knn", "carry_value", "carry_class")

    def __init__(self, text: PromptTextEncoder, tuning: TuningConfig, config: Config, templates=None):
        self.config = config
        self.text_features = classifier(text, templates)[0].float()
        self.scale = text.logit_scale().detach().float()
        self.weights = F.normalize(self.text_features.var(dim=0), dim=0)  # context-aware re-weighting, fixed
        self.capacity = 0
        self.start_stream(0)

    @property
    def n_classes(self) -> int:
        return self.text_features.shape[0]

    def start_stream(self, n_samples: int) -> None:
        """A new stream of `n_samples` (0 = unknown): room for all of its nodes, then `reset()`."""
        self.capacity = 0
        self.allocate(max(n_samples, INITIAL_NODES) + 2)
        self.reset()

    def reset(self) -> None:
        """An empty graph (only the text nodes) and a fresh id counter; the allocation is kept."""
        self.n_nodes = 0  # persistent sample nodes
        self.width = 0  # columns of the candidate store in use
        self.scores = None  # the last query copy's propagated scores [C], for inspection

    def allocate(self, capacity: int) -> None:
        """Per-node arrays for `capacity` nodes, keeping what the current ones hold."""
        if capacity <= self.capacity:
            return
        device, dim = self.text_features.device, self.text_features.shape[1]
        store, k_text = self.config.k_image + 2, min(self.config.k_text, self.n_classes)
        fresh = {
            "weighted": torch.zeros(capacity, dim, device=device),  # normalise(x * w)
            "unit": torch.zeros(capacity, dim, device=device),  # normalise(x)
            "store_sim": torch.zeros(capacity, store, device=device),
            "store_knn": torch.zeros(capacity, store, dtype=torch.long, device=device),
            "text_sim": torch.zeros(capacity, k_text, device=device),
            "text_knn": torch.zeros(capacity, k_text, dtype=torch.long, device=device),
            "carry_value": torch.zeros(capacity, device=device),  # Y_0 as (value, class) per node
            "carry_class": torch.zeros(capacity, dtype=torch.long, device=device),
        }
        for name, tensor in fresh.items():
            if self.capacity:
                tensor[: self.capacity] = getattr(self, name)
            setattr(self, name, tensor)
        self.capacity = capacity

    def state_dict(self) -> dict:
        """The graph's persistent nodes: their rows of every per-node array, and the store width."""
        state = {name: getattr(self, name)[: self.n_nodes].clone() for name in self.ARRAYS}
        return {**state, "n_nodes": self.n_nodes, "width": self.width}

    def load_state_dict(self, state: dict) -> None:
        n_nodes = int(state["n_nodes"])
        self.allocate(n_nodes + 2)
        for name in self.ARRAYS:
            getattr(self, name)[:n_nodes] = state[name]
        self.n_nodes, self.width, self.scores = n_nodes, int(state["width"]), None

    def extend(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new node and its query copy; the image-image edges (similarities, neighbours) of all N rows."""
        config, old = self.config, self.n_nodes
        total = old + 2
        k = min(config.k_image, total)
        self.weighted[old:total] = F.normalize(feature * self.weights, dim=0)
        self.unit[old:total] = F.normalize(feature, dim=0)
        if old == 0:  # first sample: the full similarity of the two rows
            sims, knn = (self.weighted[:2] @ self.unit[:2].t()).topk(k, dim=1)
            self.store_sim[:2, :k], self.store_knn[:2, :k], self.width = sims, knn, k
            return sims, knn
        cross = self.unit[old:total] @ self.weighted[:total].t()  # [2, N]: S(b, new) for every node b
        new_sims, new_knn = cross.topk(k, dim=1)
        stored_knn = self.store_knn[:old, : self.width]
        stored_sim = self.store_sim[:old, : self.width].masked_fill(stored_knn == old, config.stale_similarity)
        candidates_sim = torch.cat([stored_sim, cross[:, :old].t()], dim=1)
        new_index = torch.full((old, 1), old, dtype=torch.long, device=stored_knn.device)
        candidates_knn = torch.cat([stored_knn, new_index, new_index + 1], dim=1)
        width = store_width(old, k)
        top_sim, position = candidates_sim.topk(width, dim=1)
        top_knn = candidates_knn.gather(1, position)
        self.store_sim[:old, :width], self.store_knn[:old, :width] = top_sim, top_knn
        if old > k:
            self.store_sim[old:total, :width], self.store_knn[old:total, :width] = cross.topk(width, dim=1)
        else:
            self.store_sim[old:total, :k], self.store_knn[old:total, :k] = new_sims, new_knn
        self.width = width
        return torch.cat([top_sim[:, :k], new_sims]), torch.cat([top_knn[:, :k], new_knn])

    def propagate(self, image_sims: torch.Tensor, image_knn: torch.Tensor) -> torch.Tensor:
        """The authors' label propagation over text + N image nodes; the scores of all N image rows [N, C]."""
        config, n_classes = self.config, self.n_classes
        total = image_sims.shape[0]
        size = n_classes + total
        device = image_sims.device
        neighbours = torch.cat([image_knn + n_classes, self.text_knn[:total]], dim=1)
        weights = torch.cat([image_sims, self.text_sim[:total]], dim=1) ** config.gamma
        rows = (n_classes + torch.arange(total, device=device)).repeat_interleave(neighbours.shape[1])
        cols = neighbours.flatten()
        values = weights.flatten()
        graph = torch.sparse_coo_tensor(torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
                                        torch.cat([values, values]), (size, size), check_invariants=False)
        graph = graph.coalesce()  # W + W^T
        degree = torch.sparse.sum(graph, dim=1).to_dense()
        scale = 1 / (torch.sqrt(degree) + config.degree_eps)
        index = graph.indices()
        normalised = torch.sparse_coo_tensor(index, graph.values() * scale[index[0]] * scale[index[1]],
                                             (size, size), is_coalesced=True, check_invariants=False)
        carry = torch.zeros(total, n_classes, device=device)
        carry.scatter_(1, self.carry_class[:total, None], self.carry_value[:total, None])
        labels = torch.cat([torch.eye(n_classes, device=device), carry])
        for _ in range(config.iterations):
            estimate = config.alpha * torch.sparse.mm(normalised, labels)[n_classes:] + (1 - config.alpha) * carry
            labels = torch.cat([labels[:n_classes], estimate])
        return labels[n_classes:]

    @torch.no_grad()
    def __call__(self, view_features: torch.Tensor) -> Outcome:
        config, old = self.config, self.n_nodes
        if old + 2 > self.capacity:  # a stream longer than announced: double the room
            self.allocate(max(2 * self.capacity, old + 2))
        feature = node_feature(view_features, config.view)
        before = entropy(self.scale * self.text_features @ feature)
        k_text = min(config.k_text, self.n_classes)
        self.text_sim[old:old + 2], self.text_knn[old:old + 2] = (self.text_features @ feature).topk(k_text)
        self.carry_value[old:old + 2] = 0.0  # the previous query copy's row goes; the new node and copy start at 0
        self.carry_class[old:old + 2] = 0
        scores = self.propagate(*self.extend(feature))
        top_value, top_class = scores.topk(1, dim=1)
        self.carry_value[: old + 2] = top_value[:, 0] / config.carry_divisor
        self.carry_class[: old + 2] = top_class[:, 0]
        self.scores = scores[-1]
        output = self.scores * config.output_scale  # the authors' softmax(10000 * scores), as logits
        pred, before, after = torch.stack([output.softmax(-1).argmax().double(), before.double(),
                                           entropy(output).double()]).tolist()
        self.n_nodes = old + 1
        return Outcome(pred=int(pred), entropy_before=before, entropy_after=after, appended=[old],
                       buffer_size=self.n_nodes)

    def snapshot(self) -> dict:
        """The persistent nodes' carried labels [(class, value)] and candidate stores [[(node, similarity)]], read
        from the device (for inspection and tests)."""
        n = self.n_nodes
        return {"carry": list(zip(self.carry_class[:n].tolist(), self.carry_value[:n].tolist())),
                "store": [list(zip(knn, sim)) for knn, sim in zip(self.store_knn[:n, : self.width].tolist(),
                                                                  self.store_sim[:n, : self.width].tolist())]}

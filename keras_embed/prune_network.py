"""Exact pruning of convolutional and branching models: collapse, channel rules, verify.

The `Network` counterpart of `compress.prune` (which handles Dense chains). Steps:
1. with data, one streaming pass (`stats.LayerStats` per channel, over every sample and
   position) gives each producer's regime and the constant channels on the data;
2. rounds of the channel rules (`channel_rules`) until none applies;
3. layers linear on the data (without data: with linear activations) fold into their
   reader (`channel_collapse`), judged at the widths step 2 left, then step 2 again;
4. the rebuilt model is checked against the original (`verify`).

Example:
    >>> pruned, report = prune_network(model, data=x)
    >>> report.to_dict()["layers"][0]["channels_removed"]
    12
"""

import dataclasses
import time
import types

import numpy as np

from keras_embed.channel_collapse import candidates, collapse_linear
from keras_embed.channel_rules import find_channel_edits, weight_constants
from keras_embed.channel_surgery import apply_maps, layout_gather
from keras_embed.data import batches, check_inputs
from keras_embed.linearity import DEFAULT_LIN_TOL, unit_regimes
from keras_embed.network import PRODUCERS, build_network, probe_outputs, read_network
from keras_embed.stats import LayerStats, one_blas_thread
from keras_embed.verify import assert_outputs_preserved, calibration_inputs


def _chain_end(chain, producer):
    return chain[-1].name if chain else producer.name


def channel_statistics(network, data, batch_size=256, on_batch=None):
    """One pass over `data`: ({producer: LayerStats of (pre-activation, chain end)} for
    collapse candidates, {node read by a Dense/Conv2D: LayerStats of its output})."""
    pairs = {producer.name: (f"{producer.name}/z", _chain_end(chain, producer)) for producer, chain, _ in candidates(network)}
    read = sorted({source for node in network.nodes if node.kind in PRODUCERS for source in node.inputs} - {network.input_name})
    names = sorted({name for pair in pairs.values() for name in pair} | set(read))
    probe = build_network(network, outputs=names, split_activations=True)
    widths = {name: network.by_name[name.split("/")[0]].width for name in names}
    regimes = {name: LayerStats(network.by_name[name].width, None) for name in pairs}
    values = {name: LayerStats(widths[name], None) for name in read}
    with one_blas_thread():
        for batch in batches(data, batch_size):
            outputs = probe_outputs(probe, check_inputs(batch, probe))
            outputs = {name: output.reshape(-1, widths[name]) for name, output in zip(names, outputs)}
            for name, (z, a) in pairs.items():
                regimes[name].update(outputs[z], outputs[a])
            for name in read:
                values[name].update(outputs[name], outputs[name])
            if on_batch is not None:
                on_batch(len(batch))
    return regimes, values


def producer_regimes(network, stats=None, lin_tol=DEFAULT_LIN_TOL, rtol=1e-6):
    """`Regimes` of every collapse candidate: from `stats` (see `channel_statistics`), or
    without data only the linear ones."""
    regimes = {}
    for producer, chain, _ in candidates(network):
        layer = types.SimpleNamespace(width=producer.width, activations=(producer.activation, *(node.activation for node in chain)))
        layer_stats = None if stats is None else stats.get(producer.name)
        regimes[producer.name] = unit_regimes(layer, layer_stats, lin_tol, rtol)
    return regimes


def data_constants(values, rtol=1e-6):
    """Node name -> per position the value it holds on every sample (NaN where it varies)."""
    constants = {}
    for name, layer_stats in values.items():
        scale = max(float(np.abs([layer_stats.a_min, layer_stats.a_max]).max(initial=0.0)), 1e-30)
        constant = layer_stats.a_max - layer_stats.a_min <= rtol * scale
        value = np.where(layer_stats.a_max == 0, 0.0, layer_stats.a_mean)
        constants[name] = np.where(constant, value, np.nan)
    return constants


def _merge_constants(from_weights, from_data):
    return {name: np.where(np.isnan(values), from_data[name], values) if name in from_data else values
            for name, values in from_weights.items()}


def channel_rounds(network, known=None, regimes=None, rtol=1e-6):
    """Applies the channel rules until none applies.

    Args:
        known: constants measured on data (node -> value per position).
        regimes: producer -> `Regimes` of its channels.
        Both are carried along as channels go (kept channels keep their values).

    Returns:
        (network, known, regimes) after the last round.
    """
    known, regimes = dict(known or {}), dict(regimes or {})
    while True:
        constants = _merge_constants(weight_constants(network), known)
        maps = find_channel_edits(network, constants, rtol)
        if not maps:
            return network, known, regimes
        known = {name: values[layout_gather(network, name, maps)] for name, values in known.items() if name in network.by_name}
        regimes = {name: regime.subset(maps[network.groups[name]].keep) if network.groups[name] in maps else regime
                   for name, regime in regimes.items()}
        network = apply_maps(network, maps, constants)


@dataclasses.dataclass(frozen=True)
class Reduction:
    """A network before and after the rules, and what they found."""

    before: object
    after: object
    collapsed: list
    skipped: list
    regimes: dict

    def layers(self):
        """One row per Dense/Conv2D layer: widths before and after, channels removed,
        share of channels linear on the data (None without data, for non-candidates)."""
        after = self.after.by_name
        rows = []
        for node in self.before.nodes:
            if node.kind not in PRODUCERS:
                continue
            width_after = after[node.name].width if node.name in after else 0
            regime = self.regimes.get(node.name)
            rows.append({
                "name": node.name, "kind": node.kind, "width_before": node.width, "width_after": width_after,
                "channels_removed": node.width - width_after if width_after else 0,
                "linearized": None if regime is None else round(float(regime.linear.mean()), 4),
            })
        return rows


def reduce_network(network, data=None, rtol=1e-6, lin_tol=DEFAULT_LIN_TOL, allow_growth=False, batch_size=256, on_batch=None):
    """Steps 1-3 of the module docstring on a `Network`; returns the `Reduction`."""
    stats, values = channel_statistics(network, data, batch_size, on_batch) if data is not None else (None, {})
    regimes = producer_regimes(network, stats, lin_tol, rtol)
    reduced, known, current = channel_rounds(network, data_constants(values, rtol), regimes, rtol)
    reduced, collapsed, skipped = collapse_linear(reduced, current, allow_growth)  # at the smallest widths
    reduced, _, _ = channel_rounds(reduced, known, rtol=rtol)
    return Reduction(network, reduced, collapsed, skipped, regimes)


@dataclasses.dataclass(frozen=True)
class NetworkReport:
    """What `prune_network` (or `compress.prune` in data mode) did: the `Reduction` and
    the verification figures."""

    reduction: Reduction
    calibration: str
    checks: dict
    seconds: float
    mode: str = "exact"

    def to_dict(self):
        before, after = self.reduction.before, self.reduction.after
        layers = self.reduction.layers()
        return {
            "mode": self.mode,
            "params_before": before.params, "params_after": after.params,
            "depth_before": sum(node.kind in PRODUCERS for node in before.nodes),
            "depth_after": sum(node.kind in PRODUCERS for node in after.nodes),
            "flops_before": before.flops, "flops_after": after.flops,
            "layers": layers,
            "removed": {"channels": sum(layer["channels_removed"] for layer in layers)},
            "collapsed_layers": self.reduction.collapsed, "not_collapsed_would_grow": self.reduction.skipped,
            **self.checks, "calibration": self.calibration, "seconds": round(self.seconds, 3),
        }


def prune_network(model, rtol=1e-6, data=None, atol=None, force=False, *, validation=None, lin_tol=DEFAULT_LIN_TOL,
                  allow_growth=False, batch_size=256, on_batch=None):
    """Exact pruning of a model `read_network` reads (see the module docstring).

    Returns:
        (pruned stock Keras model, `NetworkReport`); `model` is untouched.

    Raises:
        VerificationError: outputs differ by more than `atol` (and not `force`).
    """
    start = time.perf_counter()
    reduction = reduce_network(read_network(model), data, rtol, lin_tol, allow_growth, batch_size, on_batch)
    pruned = build_network(reduction.after)
    calibration = "user data"
    if data is None:
        data, calibration = calibration_inputs(model), "1024 seeded standard-normal inputs"
    diff, atol = assert_outputs_preserved(model, pruned, data, atol, raise_error=not force, batch_size=batch_size)
    checks = {"max_abs_diff": diff, "atol": atol, "max_abs_diff_validation": None, "verified": diff <= atol}
    if validation is not None:
        checks["max_abs_diff_validation"] = assert_outputs_preserved(model, pruned, validation, atol, not force, batch_size)[0]
        checks["verified"] = checks["verified"] and checks["max_abs_diff_validation"] <= atol
    return pruned, NetworkReport(reduction, calibration, checks, time.perf_counter() - start)

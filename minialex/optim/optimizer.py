"""What SGD and Adam share: parameter groups, per-parameter state, zero_grad and state_dict."""
import copy

import numpy as np


class Optimizer:
    defaults = {}

    def __init__(self, params, defaults):
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for g in groups:
            group = dict(defaults)
            group.update(g)
            group["params"] = list(group["params"])
            self.param_groups.append(group)
        # state[i] belongs to the i-th parameter in group order, as PyTorch numbers them.
        self.state = {}

    def _indexed_params(self):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, p, group
                i += 1

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.zero_grad()

    def step(self):
        raise NotImplementedError

    def state_dict(self):
        """{"state": {i: {name: array or number}}, "param_groups": [hyper-parameters, "params": [i...]]}"""
        groups, i = [], 0
        for group in self.param_groups:
            g = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            g["params"] = list(range(i, i + len(group["params"])))
            i += len(group["params"])
            groups.append(g)
        state = {i: {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match the parameter groups of this optimizer")
        for g, mine in zip(groups, self.param_groups):
            for k, v in g.items():
                if k != "params":
                    mine[k] = v
        params = [p for _, p, _ in self._indexed_params()]
        self.state = {}
        for key, s in state_dict["state"].items():
            i = int(key)
            entry = {}
            for k, v in s.items():
                if isinstance(v, np.ndarray) and v.ndim > 0:
                    if v.shape != params[i].data.shape:
                        raise ValueError(f"optimizer state {k} of parameter {i} has shape {v.shape}, "
                                         f"expected {params[i].data.shape}")
                    v = np.ascontiguousarray(v, dtype=params[i].data.dtype).copy()
                elif isinstance(v, np.ndarray):
                    v = v.item()
                entry[k] = v
            self.state[i] = entry

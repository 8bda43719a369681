"""What a run prints while it works: progress lines with rates and ETAs, and the metrics that apply.

`DistillProgress` makes the distillation's lines (rate and ETA measured after the compiling first
iteration), `EvalProgress` is the `progress` callback of `evaluation.evaluate_synthetic` (network-
epochs done, rate, ETA; at most one line per `min_interval` seconds, plus the last), and
`RunEstimate` adds both up into an estimate for the whole run: the distillation left at the measured
rate plus the evaluations left (intermediate and final, of every experiment) at the measured
evaluation rate of each architecture. Until an architecture has been evaluated once, the run's
evaluation time is unknown and the lines say so instead of guessing.

Every class takes its clock as an argument, so tests drive time.
"""

import time

from absl import logging


def shown_metrics(metrics, config):
    """`metrics` without the terms `config` does not use: what progress lines and logs record.

    The step reports every term for every method (zeros where unused); a DM line showing
    `ce_loss 0 ce_multiplier 0 cmi_loss 0` says nothing.
    """
    hidden = set()
    if config.method not in ("idm", "bacon") or not config.syn_ce:
        hidden |= {"ce_loss", "ce_multiplier"}
    if float(config.cmi.weight) == 0.0:
        hidden.add("cmi_loss")
    return {name: value for name, value in metrics.items() if name not in hidden}


def minutes(seconds):
    return f"{seconds / 60:.1f} min"


class RunEstimate:
    """The time left in a run, from the measured distillation and evaluation rates.

    Args:
        iterations: distillation iterations per experiment.
        num_exp: experiments.
        eval_every: iterations between intermediate evaluations.
        intermediate: whether intermediate evaluations run.
        models: the architectures every evaluation trains.
        net_epochs: network-epochs of one evaluation of one architecture (num_eval x (epochs + 1)).
    """

    def __init__(self, *, iterations, num_exp, eval_every, intermediate, models, net_epochs):
        self.iterations, self.num_exp = iterations, num_exp
        self.eval_every, self.intermediate = eval_every, intermediate
        self.models, self.net_epochs = tuple(models), net_epochs
        self.distill_rate = None  # iterations per second
        self.eval_rates = {}  # architecture -> network-epochs per second

    @classmethod
    def from_config(cls, config, iterations):
        return cls(iterations=iterations, num_exp=int(config.num_exp),
                   eval_every=int(config.eval.every), intermediate=bool(config.eval.intermediate),
                   models=config.eval.models,
                   net_epochs=int(config.eval.num_eval) * (int(config.eval.epochs) + 1))

    def evaluations_from(self, exp, first):
        """Evaluations at iterations >= `first` of experiment `exp`, and in the later experiments."""

        def in_experiment(start):
            count = 1  # the final one, at `iterations`
            if self.intermediate:
                count += sum(1 for it in range(max(start, 1), self.iterations)
                             if it % self.eval_every == 0)
            return count if start <= self.iterations else 0

        return in_experiment(first) + (self.num_exp - exp - 1) * in_experiment(0)

    def evaluation_seconds(self, models=None):
        """Estimated seconds of one evaluation of `models` (default all), or None if not measured."""
        models = self.models if models is None else models
        if any(name not in self.eval_rates for name in models):
            return None
        return sum(self.net_epochs / self.eval_rates[name] for name in models)

    def seconds_left(self, exp, it, evaluations_first):
        """Seconds left in the run, or None while a rate is unknown.

        Args:
            exp: the current experiment.
            it: distillation iterations done in it.
            evaluations_first: the first iteration whose evaluation is still to come.
        """
        distill = (self.iterations - it) + (self.num_exp - exp - 1) * self.iterations
        per_evaluation = self.evaluation_seconds()
        if per_evaluation is None or (distill and not self.distill_rate):
            return None
        evaluations = self.evaluations_from(exp, evaluations_first)
        return (distill / self.distill_rate if distill else 0.0) + evaluations * per_evaluation

    def run_eta(self, seconds):
        if seconds is None:
            return "run ETA: evaluation not timed yet"
        return f"run ETA est. {minutes(seconds)}"


class DistillProgress:
    """Lines of the distillation loop; rate and ETA are measured from the first line on.

    The first line comes after the compiling first iteration, so its time is not counted.
    """

    def __init__(self, total, estimate, exp, clock=time.monotonic):
        self.total, self.estimate, self.exp, self.clock = total, estimate, exp, clock
        self.t0, self.it0 = None, None

    def line(self, it, metrics):
        """The progress line after `it` iterations with `metrics` (name -> float)."""
        now = self.clock()
        if self.t0 is None:
            self.t0, self.it0 = now, it
        scalars = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        head = f"[exp {self.exp}] it {it}/{self.total} {scalars}"
        if it <= self.it0:
            return f"{head} | rate and ETA from the next line on"
        rate = (it - self.it0) / max(now - self.t0, 1e-9)
        self.estimate.distill_rate = rate
        run = self.estimate.run_eta(self.estimate.seconds_left(self.exp, it, it))
        return (f"{head} | {rate:.3g} it/s, distillation ETA {minutes((self.total - it) / rate)}, "
                f"{run}")


class EvalProgress:
    """The `progress` callback of one evaluation of one architecture: lines with rate and ETA.

    Args:
        estimate: the run's RunEstimate (receives this architecture's rate when done).
        exp: the experiment.
        iteration: the iteration evaluated.
        model: the architecture.
        later_models: the architectures this evaluation trains after `model`.
        total: network-epochs of the evaluation (the callback's counts add up to it).
        min_interval: seconds between lines (the last one is always printed).
        clock: time source; log: where lines go.
    """

    def __init__(self, estimate, exp, iteration, model, later_models, total, *, min_interval=10.0,
                 clock=time.monotonic, log=logging.info):
        self.estimate, self.exp, self.iteration = estimate, exp, iteration
        self.model, self.later_models, self.total = model, tuple(later_models), total
        self.min_interval, self.clock, self.log = min_interval, clock, log
        self.done, self.start = 0, clock()
        self.t0 = self.done0 = self.last = None

    def _rate(self, now):
        """Network-epochs per second since the first call (which waited for compilation)."""
        return (self.done - self.done0) / max(now - self.t0, 1e-9)

    def _head(self):
        return (f"[exp {self.exp}] evaluation at it {self.iteration}, {self.model}: "
                f"{self.done}/{self.total} network-epochs")

    def __call__(self, count):
        self.done += count
        now = self.clock()
        finished = self.done >= self.total
        if self.t0 is None:  # the first call waited for compilation: rates count from here
            self.t0, self.done0, self.last = now, self.done, now
            self.log(f"{self._head()} after {now - self.start:.1f} s (compilation included)")
        elif finished or now - self.last >= self.min_interval:
            self.last = now
            rate = self._rate(now)
            self.estimate.eval_rates.setdefault(self.model, rate)  # until this one is done
            left = (self.total - self.done) / rate
            self.log(f"{self._head()}, {rate:.3g}/s, ETA {minutes(left)}, "
                     f"{self.estimate.run_eta(self._run_seconds(left))}")
        if finished:
            # After a single call (an accelerator trains all networks in one program) the only
            # rate there is includes the compilation: an overestimate, until the next evaluation.
            self.estimate.eval_rates[self.model] = (
                self._rate(now) if self.done > self.done0
                else self.done / max(now - self.start, 1e-9))

    def _run_seconds(self, left):
        """Seconds left in the run: this evaluation's rest, its later architectures, the others."""
        later = self.estimate.evaluation_seconds(self.later_models)
        after = self.estimate.seconds_left(self.exp, self.iteration, self.iteration + 1)
        if later is None or after is None:
            return None
        return left + later + after

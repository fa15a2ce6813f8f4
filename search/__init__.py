"""Search: Ray Tune runs trials, Optuna samples plans, and the Pareto front is computed.

trial.py       one trial inside a Ray worker: params -> plan -> artifact -> metrics
runner.py      the Tuner with OptunaSearch (NSGA-II or TPE), references first, failures recorded
objectives.py  what a search optimises (plain values)
records.py     TrialRecord values and their listeners (plain values: no torch, no Ray)
trial_log.py   the Ray callback that makes the records and tells the listeners
samplers.py    the Optuna samplers, picklable by Ray Tune
pareto.py      the front, by Optuna's non-dominated sorting
progress.py    the live display
"""

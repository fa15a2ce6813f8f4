"""Search: Ray Tune runs trials, Optuna samples plans, and the Pareto front is computed.

trial.py    one trial inside a Ray worker: params -> plan -> artifact -> metrics
runner.py   the Tuner with OptunaSearch (NSGA-II or TPE), references first, failures recorded
records.py  TrialRecord values and the Ray callback that produces them for listeners
pareto.py   the front, by Optuna's non-dominated sorting
progress.py the live display
"""

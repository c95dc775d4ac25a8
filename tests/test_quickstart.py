"""quickstart.py's summary.json: a re-run that skips finished stages keeps the times measured by the run
that did them (issue 20 item 10). The whole chain runs in tests/e2e/test_quickstart.py."""
import json

import quickstart


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def a_run(path, clock, work, products, capsys):
    """Stages 'corpora' and 'pretrain': `work[name]` seconds each, skipped when `products[name]` exists."""
    st = quickstart.Stages(str(path / "summary.json"), size="tiny", nproc=2)
    for n, name in enumerate(("corpora", "pretrain"), 1):
        st.begin(n, name, name)
        if not st.done(str(products[name]), name):
            products[name].mkdir()
        clock.now += work[name]
        st.note(figure=n)
    st.end()
    st.write(answers={"trained_n": 1})
    capsys.readouterr()
    return json.loads((path / "summary.json").read_text())


def test_a_rerun_keeps_the_measured_times_of_the_stages_it_skips(tmp_path, monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(quickstart.time, "time", clock)
    products = {"corpora": tmp_path / "raw", "pretrain": tmp_path / "final"}
    first = a_run(tmp_path, clock, {"corpora": 12.0, "pretrain": 600.0}, products, capsys)
    assert first["stages"] == {"corpora": {"figure": 1, "seconds": 12.0}, "pretrain": {"figure": 2, "seconds": 600.0}}
    assert first["total_seconds"] == first["pipeline_seconds"] == 612.0 and first["answers"] == {"trained_n": 1}

    again = a_run(tmp_path, clock, {"corpora": 0.1, "pretrain": 0.2}, products, capsys)
    assert again["stages"] == {
        "corpora": {"skipped": True, "figure": 1, "seconds_this_run": 0.1, "seconds": 12.0},
        "pretrain": {"skipped": True, "figure": 2, "seconds_this_run": 0.2, "seconds": 600.0}}
    assert again["total_seconds"] == 0.3 and again["pipeline_seconds"] == 612.0
    third = a_run(tmp_path, clock, {"corpora": 0.1, "pretrain": 0.1}, products, capsys)  # kept through re-runs
    assert third["stages"]["pretrain"]["seconds"] == 600.0


def test_an_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(quickstart.time, "time", clock)
    st = quickstart.Stages(str(tmp_path / "summary.json"), size="tiny", nproc=2)
    st.begin(1, "corpora", "corpora")
    clock.now += 12.0
    st.begin(2, "pretrain", "pretrain")  # ... and the run is stopped here
    assert json.loads((tmp_path / "summary.json").read_text())["stages"] == {"corpora": {"seconds": 12.0}}
    (tmp_path / "raw").mkdir()
    products = {"corpora": tmp_path / "raw", "pretrain": tmp_path / "final"}
    again = a_run(tmp_path, clock, {"corpora": 0.1, "pretrain": 500.0}, products, capsys)
    assert again["stages"]["corpora"]["seconds"] == 12.0 and again["stages"]["pretrain"]["seconds"] == 500.0
    assert again["pipeline_seconds"] == 512.0

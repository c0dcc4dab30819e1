"""refquant.progress: the one progress-bar helper every long-running function uses."""

from refquant.progress import bar, iterate


def test_disabled_bars_are_silent_and_iterate_passes_items_through(capsys):
    b = bar(10, False, "work")
    b.update(3), b.set_postfix(loss=1.0), b.set_description("x"), b.close()
    items = [1, 2, 3]
    assert iterate(items, False, "work") is items
    assert capsys.readouterr() == ("", "")


def test_enabled_bars_report_on_stderr(capsys):
    b = bar(4, True, "calibrating", unit="sample", initial=1)
    b.update(3)
    b.close()
    assert list(iterate(range(3), True, "layers", unit="layer")) == [0, 1, 2]
    err = capsys.readouterr().err
    # tqdm draws a bar when it opens (later redraws are throttled in time): the description and the start
    assert "calibrating:" in err and "1/4" in err and "layers:" in err

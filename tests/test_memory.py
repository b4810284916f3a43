"""A training worker's memory by kind (cam2seg/train/memory.py), read from /proc."""

import numpy as np

from cam2seg.train.memory import MemoryPeaks, status_mib


def test_status_is_read_by_kind_and_missing_fields_give_none(tmp_path):
    f = tmp_path / "status"
    f.write_text("Name:\tpython\nVmHWM:\t  900000 kB\nVmRSS:\t  800000 kB\nRssAnon:\t  512000 kB\n"
                 "RssFile:\t   96256 kB\nRssShmem:\t  191744 kB\nThreads:\t12\n")
    assert status_mib(str(f)) == {"private": 500.0, "file": 94.0, "shared": 187.2}
    f.write_text("VmRSS:\t  800000 kB\n")  # a kernel before 4.5 splits nothing
    assert status_mib(str(f)) is None
    assert status_mib(str(tmp_path / "absent")) is None


def test_private_peak_follows_what_this_process_allocates():
    peaks = MemoryPeaks()
    if peaks.peaks is None:  # not Linux: only the peak resident set is reported
        assert set(peaks.fields()) == {"peak_rss_mib"}
        return
    before = peaks.fields()["peak_private_mib"]
    held = np.ones(64 * 2**20, np.uint8)  # 64 MiB, touched
    peaks.sample()
    del held
    got = peaks.fields()
    assert got["peak_private_mib"] >= before + 60
    assert got["peak_private_mib"] <= got["peak_rss_mib"] + 1


def test_an_epochs_peak_starts_again_while_the_folds_peak_keeps_the_maximum():
    peaks = MemoryPeaks()
    if peaks.peaks is None:
        assert peaks.epoch_fields() == {}
        return
    held = np.ones(64 * 2**20, np.uint8)
    peaks.sample()
    del held
    first = peaks.epoch_fields()
    assert set(first) == {"peak_private_mib", "peak_shared_mib"}
    assert peaks.epoch_fields() == {}  # nothing sampled since
    peaks.sample()
    second = peaks.epoch_fields()
    assert second["peak_private_mib"] <= first["peak_private_mib"] - 60  # the 64 MiB were freed
    assert peaks.fields()["peak_private_mib"] >= first["peak_private_mib"]

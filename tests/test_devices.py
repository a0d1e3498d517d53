"""Devices as plain values: the serial number in udev's form."""

from __future__ import annotations

import pytest

from reconnectd.devices import udev_serial


@pytest.mark.parametrize(
    ("raw", "udev"),
    [
        pytest.param("CZPX1017X004XK12345", "CZPX1017X004XK12345", id="as-is"),
        pytest.param("A#+-.:=@_z", "A#+-.:=@_z", id="allowed-punctuation"),
        pytest.param("  CZPX 1017  ", "CZPX_1017", id="ends-dropped-inside-one-underscore"),
        pytest.param("A \t\n\v\f\r B", "A_B", id="a-run-of-c-white-space-is-one-underscore"),
        pytest.param("AB,CD/1(2)", "AB_CD_1_2_", id="others-become-underscores"),
        pytest.param('q"u\\ote', "q_u_ote", id="quote-and-lone-backslash"),
        pytest.param("odd\\x20name", "odd\\x20name", id="a-hex-escape-is-kept"),
        pytest.param("\x01ctl\x7f", "_ctl_", id="controls"),
        pytest.param("Ünïcödé", "Ünïcödé", id="valid-beyond-ascii"),
        pytest.param("bad\ufffdbyte", "bad_byte", id="a-byte-that-was-not-utf-8"),
        pytest.param("non\ufdd0char\uffff", "non_char_", id="noncharacters"),
    ],
)
def test_udev_serial_is_what_udev_writes_in_id_serial_short(raw: str, udev: str) -> None:
    assert udev_serial(raw) == udev
    assert udev_serial(udev) == udev, "udev's form is its own"

"""The built-in board table: well-formed, unique, documented, and looked up by normalized id."""

from __future__ import annotations

import re

import pytest

from reconnectd.boards import KNOWN_BOARDS, Board, known_board

HEX4 = re.compile(r"[0-9a-f]{4}")


@pytest.mark.parametrize("board", KNOWN_BOARDS, ids=lambda b: f"{b.vendor_id}:{b.product_id}")
def test_board_is_well_formed_and_documented(board: Board) -> None:
    assert HEX4.fullmatch(board.vendor_id)
    assert HEX4.fullmatch(board.product_id)
    assert board.name.strip()
    assert board.source.strip()


def test_ids_are_unique() -> None:
    ids = [(board.vendor_id, board.product_id) for board in KNOWN_BOARDS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("vendor", "product", "name"),
    [
        ("2c99", "0002", "Original Prusa i3 MK3/MK3S (Einsy)"),
        ("2C99", "000C", "Original Prusa MINI/MINI+"),
        ("0x2341", "0x0042", "Arduino Mega 2560 R3"),
        (" 1a86 ", "7523", "CH340 USB-serial bridge"),
        ("1d50", "6029", "Marlin 2.0 serial (LPC176x)"),
        ("1d50", "60ec", "Duet 2 WiFi/Ethernet"),
        ("0483", "5740", "STM32 virtual COM port (32-bit Marlin on STM32)"),
    ],
)
def test_lookup_is_normalized(vendor: str, product: str, name: str) -> None:
    board = known_board(vendor, product)
    assert board is not None
    assert board.name == name


@pytest.mark.parametrize(
    ("vendor", "product"),
    [
        (None, "0002"),
        ("2c99", None),
        (None, None),
        ("2c99", "ffff"),  # a known vendor, an unknown product
        ("046d", "c52b"),  # a keyboard receiver
        ("2c9", "0002"),
        ("", ""),
    ],
)
def test_unknown_or_malformed_ids_are_not_boards(vendor: str | None, product: str | None) -> None:
    assert known_board(vendor, product) is None


def test_table_covers_the_common_families() -> None:
    vendors = {board.vendor_id for board in KNOWN_BOARDS}
    assert {"2c99", "2341", "2a03", "1a86", "0403", "10c4", "0483", "1d50"} <= vendors


def test_klippers_own_id_is_a_klipper_board_and_no_other_is() -> None:
    board = known_board("1D50", "614E")
    assert board is not None and board.klipper and board.name == "Klipper firmware"
    assert [b for b in KNOWN_BOARDS if b.klipper] == [board]

"""Pure parsing: the pieces of a SentencePiece ``tokenizer.model`` (a protobuf ModelProto), read from the
wire format directly so that no sentencepiece or protobuf package is needed.

ModelProto field 1 repeats SentencePiece messages: field 1 the piece (string), field 2 its score (float),
field 3 its type (enum; NORMAL when absent). Field 3 of ModelProto is the NormalizerSpec, whose field 3 says
whether a space is put in front of the text (add_dummy_prefix, true when absent). Other fields are skipped.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: int


@dataclass(frozen=True)
class SentencePieceModel:
    pieces: list[Piece]
    add_dummy_prefix: bool


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of each field of one message: ints for varints, bytes otherwise."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at:at + length], at + length
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if at > len(data):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def _piece(message: bytes) -> Piece:
    text, score, kind = "", 0.0, NORMAL
    for number, wire, value in _fields(message):
        if number == 1 and wire == 2:
            text = value.decode("utf-8")
        elif number == 2 and wire == 5:
            score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == 0:
            kind = value
    return Piece(text, score, kind)


def read_sentencepiece(data: bytes) -> SentencePieceModel:
    pieces, add_dummy_prefix = [], True
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            pieces.append(_piece(value))
        elif number == 3 and wire == 2:
            for field, field_wire, flag in _fields(value):
                if field == 3 and field_wire == 0:
                    add_dummy_prefix = bool(flag)
    if not pieces:
        raise ValueError("no pieces in the SentencePiece model")
    return SentencePieceModel(pieces, add_dummy_prefix)

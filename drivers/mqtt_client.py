"""paho's client with buffered socket reads, for the MQTT driver's network thread.

paho reads each packet with three recv() calls (the command byte, the length bytes, the rest) and goes through a
select() and its loop bookkeeping for every packet: at 10,000 messages a second that is 40,000 system calls, each
releasing and taking back the GIL that the pipeline thread holds most of the time. `BufferedClient` reads what the
socket has, up to READ_CHUNK_BYTES, in one recv() and hands paho its small reads from that buffer; `loop_read` goes
on while a packet is buffered, since select() cannot see the buffer. Packets are parsed as before, in order, one at
a time; only where their bytes come from changes.

Every message goes to `on_message`: paho's per-topic callbacks (`message_callback_add`) are not offered, which
spares each message paho's search for them (a walk of its topic tree in Python, about a tenth of its handling).

The usual PUBLISH (QoS 0 or 1 with manual ack, no MQTT 5 properties, no paho logging) is decoded here: paho builds
a `Properties` object for every MQTT 5 message (two tables of 27 entries, rebuilt each time: more than the rest
of its decoding) and an `MQTTMessageInfo` with its Condition, which serves outgoing messages only. The message
handed to `on_message` is a `ReceivedMessage`: `properties` None (there are none), no `info`. Any other packet
is paho's to decode, as before.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTT_LOG_ERR, MQTTv5, mqtt_ms_invalid
from paho.mqtt.enums import MQTTErrorCode

READ_CHUNK_BYTES = 65536
_UINT16 = struct.Struct("!H")


class ReceivedMessage(mqtt.MQTTMessage):
    """An incoming message as paho's MQTTMessage holds it, without the `info` paho gives outgoing messages."""

    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, qos: int, dup: bool, retain: bool, payload: bytes) -> None:
        # MQTTMessage.__init__ is not called: it creates the MQTTMessageInfo this class is without.
        self.timestamp = time.monotonic()  # paho's clock for message.timestamp
        self.state = mqtt_ms_invalid
        self.mid, self._topic, self.qos, self.dup, self.retain, self.payload = mid, topic, qos, dup, retain, payload
        self.properties = None


class BufferedClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = b""
        self._read_pos = 0
        self._read_socket: object = None  # the socket the buffer's bytes came from

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._sock is not self._read_socket:  # a new connection: nothing of the old one is parsed
            self._read_buffer, self._read_pos, self._read_socket = b"", 0, self._sock
        buffer, pos = self._read_buffer, self._read_pos
        if pos >= len(buffer):
            data = super()._sock_recv(max(bufsize, READ_CHUNK_BYTES))  # raises as paho expects (would block, error)
            if len(data) <= bufsize:  # all of it wanted (or b"": the connection closed)
                self._read_buffer, self._read_pos = b"", 0
                return data
            buffer, pos = data, 0
            self._read_buffer = buffer
        end = pos + bufsize
        self._read_pos = end
        return buffer[pos:end]

    def _buffered(self) -> bool:
        return self._sock is self._read_socket and self._read_pos < len(self._read_buffer)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # Each call parses at least one buffered byte, so this ends once the buffer is used up.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._buffered():
            rc = super().loop_read(max_packets)
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        command, packet = self._in_packet["command"], self._in_packet["packet"]
        qos = (command & 0x06) >> 1
        if qos > 1 or not self._manual_ack or self.on_log is not None or self._logger is not None:
            return super()._handle_publish()
        try:
            (topic_length,) = _UINT16.unpack_from(packet, 0)
            pos = 2 + topic_length
            mid = _UINT16.unpack_from(packet, pos)[0] if qos else 0
        except struct.error:  # too short: paho says how it is malformed
            return super()._handle_publish()
        pos += 2 if qos else 0
        if pos > len(packet):  # a topic longer than the packet: paho says how it is malformed
            return super()._handle_publish()
        if self._protocol == MQTTv5:
            if pos >= len(packet) or packet[pos] != 0:  # properties (a topic alias...), or malformed
                return super()._handle_publish()
            pos += 1
        if topic_length == 0:  # needs a topic alias (MQTT 5), or malformed (3.1.1)
            return super()._handle_publish()
        message = ReceivedMessage(mid, bytes(packet[2:2 + topic_length]), qos, bool(command & 0x08),
                                  bool(command & 0x01), bytes(packet[pos:]))
        self._handle_on_message(message)
        return MQTTErrorCode.MQTT_ERR_SUCCESS  # QoS 1: acknowledged by the driver (manual ack)

    def message_callback_add(self, sub: str, callback: mqtt.CallbackOnMessage) -> None:
        raise NotImplementedError("BufferedClient hands every message to on_message")

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """paho's own, for a client without per-topic callbacks."""
        on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

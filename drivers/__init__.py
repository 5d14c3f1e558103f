"""Where readings come from: Modbus (TCP, RTU), MQTT, and the plant simulator."""

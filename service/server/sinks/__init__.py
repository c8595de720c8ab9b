"""Result sinks: where each answer goes besides the HTTP caller (MQTT broker, webhook).

`outbox` holds the bounded queue and worker every sink shares; `mqtt` and `webhook` are the
transports (the `sinks` extra: paho-mqtt, urllib3), imported only when configured.
"""

"""Outbound delivery of task events to subscribers (Standard Webhooks), the outbox's far end.

    models.py    Subscription, Delivery, Attempt; event filters (`task.*`, `*`, exact types)
    schedule.py  retry schedule with jitter, Retry-After, what an answer means (pure)
    secrets.py   subscription secrets encrypted at rest (AES-GCM); the task-webhook secret
    handler.py   the `deliver` job: sign, POST through the SSRF guard, record, reschedule or settle
    service.py   use cases behind /v1/subscriptions, /v1/deliveries and /v1/webhook-secret

The fan-out and the delivery use cases are the store's (relay.store.outbox, relay.store.deliveries).
One delivery row per (event, subscriber) is written in the same transaction as
the event, with one `deliver` job (dedupe key `deliver:{delivery id}`). The
delivery row is the truth (status, attempts, next attempt); the job is only
its wake-up call, so a job that runs early, twice, or after a crash does the
right thing. `webhook-id` is the event id: the same on every retry and for
every subscriber.
"""

"""The HTTP adapter (DESIGN section 6), one module per concern:

- ``app``: the FastAPI apps from the routers (``create_app``, ``create_service_app``,
  ``install_api``), nothing else;
- ``auth``: bearer tokens and scopes; ``context``: what the routes share (engine, Stripe, clock);
- ``routing`` (the route class: Decimal JSON, the error shape), ``errors`` (the error shape and the
  mapping of domain and transient errors to HTTP), ``models`` (request and response bodies);
- the routers: ``topups`` (create-intent, confirm), ``wallets`` (wallet and rental reads),
  ``stripe_webhook``, ``finance``, ``docs`` (``/``, ``/docs``), ``operations`` (``/healthz``,
  ``/readyz``, ``/metrics`` of ``billing up``);
- ``limits``: bounds on slow and hostile clients (deadlines, the guard before the body).

Nothing here imports the package itself: import the module you need.
"""

"""Developer tools outside the service package: ``billing demo`` (``devtools.demo``) and the
generators of ``asyncapi.json`` and ``openapi.json`` (``python -m devtools.asyncapi --check``,
``python -m devtools.export_openapi --check``). The service never imports this package, except
``billing demo``, lazily."""

"""``python -m serving``: serve with settings from ``EMAREC_*`` variables."""

import logging

from pydantic import ValidationError

from serving.config import ServingSettings


def main() -> None:
    """Configure logging, read settings and serve.

    Raises:
        SystemExit: the settings are invalid.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = ServingSettings()
    except ValidationError as exc:
        raise SystemExit(f"invalid serving settings:\n{exc}") from None
    # Imported only now so bad settings fail fast, before torch and MLflow load.
    from serving.cli import serve

    serve(settings)


if __name__ == "__main__":
    main()

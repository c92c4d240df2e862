"""python -m pipeline.client: recommendations from the deployed model (see pipeline.serving.client)."""
from pipeline.serving.client import main
from pipeline.serving.config import main_guard

if __name__ == "__main__":
    main_guard(main)

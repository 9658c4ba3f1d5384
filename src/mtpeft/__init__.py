"""mtpeft: multi-task parameter-efficient fine-tuning."""

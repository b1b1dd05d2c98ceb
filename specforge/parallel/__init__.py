"""Running one training job on several processes: data parallel (FSDP2 over the draft) and tensor parallel
(the target split over `parallel.tp_size` ranks). A single process without a launcher needs none of it."""

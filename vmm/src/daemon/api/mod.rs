//! The daemon's API: HTTP/1.1 with JSON bodies on the daemon's Unix socket (mode 0600, and
//! only the daemon's uid or root is served), so `curl --unix-socket` works as it does with
//! Firecracker and Cloud Hypervisor; `ddvmm ctl` is the convenient client.
//!
//! | method and path                | body                                   | reply |
//! |--------------------------------|----------------------------------------|-------|
//! | `GET /v1/vms`                  |                                        | 200 `{"vms":[{name,role,state,...}]}` |
//! | `GET /v1/stats`                |                                        | 200 `{<vm>:{devices,channels}}` |
//! | `GET /v1/events`               |                                        | 200 `{"events":[..],"cold_boots_ms":[..]}` |
//! | `GET /v1/metrics`              |                                        | 200 Prometheus text |
//! | `PUT /v1/vms/{vm}/start`       |                                        | 204 |
//! | `PUT /v1/vms/{vm}/stop`        |                                        | 204 once the VM is gone |
//! | `PUT /v1/vms/{vm}/fault`       | `{"kind":"panic"}`                     | 204 once injected |
//! | `PUT /v1/vms/{vm}/campaign`    | `{"faults":N,"kinds":[..],"min_interval_ms":A,"max_interval_ms":B,"seed":S}` | 200 `{"events":[..]}` when all N faults are recovered |
//! | `PUT /v1/vms`                  | `{"client":[{..}],"driver":[{..}]}`: the configuration file's tables | 200 `{"vms":[..]}`: the VMs added and started |
//! | `PUT /v1/vms/{vm}/remove`      | optional `{"force":true}`              | 204 once the VM is stopped and removed |
//! | `PUT /v1/shutdown`             |                                        | 204, then the daemon stops every VM |
//!
//! Errors: a 4xx/5xx status with `{"error":"..."}` (400 malformed, 403 another user, 404 no
//! route or VM, 405 wrong method, 409 the VM's state forbids it, 413 body over 64 KiB, 500,
//! 504). `docs/openapi.json` describes all of it; a test checks it against this server.
//!
//! - [`model`]: the request and reply types and the routes, shared with the client.
//! - [`server`]: the hyper server and the dispatch to the supervisor.

pub mod model;
pub mod server;

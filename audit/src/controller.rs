//! The controller of a run on a real broker: prepares the database and broker, runs the
//! workers as child processes, injects faults on the seeded schedule, lets everything drain,
//! and counts.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, SqliteConnection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use waybill_cli::connect::BrokerArgs;

use crate::broker::{Broker, Kind};
use crate::counter;
use crate::db::{self, AuditConnection, DbPool};
use crate::kafka_broker::{self, PrivateKafka};
use crate::operator::Operator;
use crate::pipeline::{retry_budget, LEASE, PUBLISH_TIMEOUT};
use crate::proxy::{self, Proxy};
use crate::report::{Faults, Report};
use crate::worker::{BROKER_URL_ENV, DATABASE_URL_ENV};
use crate::{Break, Database, Error, Role};

/// The signal `std::process::abort` ends a process with.
const SIGABRT: i32 = 6;

/// What a run does, whatever the database and broker.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Messages to write.
    pub(crate) messages: u64,
    /// Partition keys.
    pub(crate) keys: u64,
    /// The writer's pace, messages per second.
    pub(crate) rate: u64,
    /// The fault schedule's seed.
    pub(crate) seed: u64,
    /// The prefix of every name of the run.
    pub(crate) namespace: String,
    /// Keep the schema or file afterwards.
    pub(crate) keep: bool,
    /// The bug the `--break` self-test reintroduces, if any.
    pub(crate) broken: Option<Break>,
    /// Sequenced mode (see `--sequenced`).
    pub(crate) sequenced: bool,
}

impl Plan {
    /// How long the next outage beyond the relays' retry budget lasts: the budget when each
    /// attempt takes up to `attempt_timeout`, plus the longest a relay is paused (so a relay
    /// paused when the outage began spends its budget too), plus 1-3 s.
    pub(crate) fn long_outage(rng: &mut StdRng, attempt_timeout: Duration) -> Duration {
        retry_budget(attempt_timeout)
            + LEASE
            + Duration::from_secs(1)
            + Duration::from_millis(rng.random_range(1000..3000))
    }

    /// How long after a long outage (or the start) the next one begins.
    pub(crate) fn long_outage_gap(rng: &mut StdRng) -> Duration {
        Duration::from_millis(rng.random_range(8000..16_000))
    }

    /// How long the drain may take once the faults stopped.
    pub(crate) fn drain_timeout(&self) -> Duration {
        // A deadline, not a wait: generous, since a killed consumer stalls a NATS run.
        Duration::from_secs(60 + self.messages / 20)
    }
}

/// Where the run's tables live: a fresh PostgreSQL schema or a SQLite file.
pub(crate) enum Target {
    /// A schema named after the namespace.
    Postgres {
        /// The server URL as given.
        url: String,
        /// The schema.
        schema: String,
        /// The controller's own connection, for `pg_terminate_backend` and the cleanup.
        admin: PgConnection,
    },
    /// A database named after the namespace on a MySQL / MariaDB server.
    #[cfg(feature = "mysql")]
    Mysql {
        /// The server URL with the run's database in place of the one given.
        url: String,
        /// The database.
        database: String,
        /// The controller's own connection, for the cleanup.
        admin: diesel::MysqlConnection,
    },
    /// A SQLite file.
    Sqlite {
        /// The file.
        path: PathBuf,
    },
}

impl Target {
    /// Creates the run's schema, or picks the SQLite file.
    ///
    /// # Errors
    ///
    /// The server is unreachable.
    pub(crate) fn create(database: &Database, namespace: &str) -> Result<Self, Error> {
        match database {
            Database::Postgres(url) => {
                let mut admin = PgConnection::establish(url).map_err(|error| {
                    format!(
                        "PostgreSQL not reachable at {}: {error}",
                        waybill_amqp::redact(url)
                    )
                })?;
                // The namespace was checked against a strict pattern: safe as an identifier.
                admin.batch_execute(&format!("CREATE SCHEMA {namespace}"))?;
                Ok(Self::Postgres {
                    url: url.clone(),
                    schema: namespace.to_owned(),
                    admin,
                })
            }
            #[cfg(feature = "mysql")]
            Database::Mysql(url) => {
                let mut admin = diesel::MysqlConnection::establish(url).map_err(|error| {
                    format!(
                        "MySQL not reachable at {}: {error}",
                        waybill_amqp::redact(url)
                    )
                })?;
                // The namespace was checked against a strict pattern: safe as an identifier.
                admin.batch_execute(&format!("CREATE DATABASE {namespace}"))?;
                Ok(Self::Mysql {
                    url: with_database(url, namespace),
                    database: namespace.to_owned(),
                    admin,
                })
            }
            Database::Sqlite(path) => Ok(Self::Sqlite {
                path: path
                    .clone()
                    .unwrap_or_else(|| std::env::temp_dir().join(format!("{namespace}.sqlite3"))),
            }),
        }
    }

    /// The URL a role connects with (`None`: the controller); PostgreSQL connections carry the
    /// schema and an `application_name` the schedule can find them by.
    pub(crate) fn url(&self, role: Option<Role>) -> String {
        match self {
            Self::Postgres { url, schema, .. } => {
                let separator = if url.contains('?') { '&' } else { '?' };
                let role = role.map_or("controller", Role::name);
                format!(
                    "{url}{separator}options=-csearch_path%3D{schema}&application_name={schema}-{role}"
                )
            }
            #[cfg(feature = "mysql")]
            Self::Mysql { url, .. } => url.clone(),
            Self::Sqlite { path } => format!("sqlite://{}", path.display()),
        }
    }

    /// The URL as the connection type's pool wants it.
    pub(crate) fn pool_url(&self) -> String {
        match self {
            Self::Postgres { .. } => self.url(None),
            #[cfg(feature = "mysql")]
            Self::Mysql { url, .. } => url.clone(),
            Self::Sqlite { path } => path.to_string_lossy().into_owned(),
        }
    }

    /// Terminates `role`'s PostgreSQL backends; `None` on SQLite, and on MySQL, whose
    /// connections carry no name to tell the roles apart by.
    fn terminate(&mut self, role: Role) -> Option<Result<u64, Error>> {
        match self {
            Self::Postgres { schema, admin, .. } => Some(db::terminate_backends(
                admin,
                &format!("{schema}-{}", role.name()),
            )),
            #[cfg(feature = "mysql")]
            Self::Mysql { .. } => None,
            Self::Sqlite { .. } => None,
        }
    }

    /// Drops the schema or deletes the file.
    pub(crate) fn remove(self) {
        match self {
            Self::Postgres {
                schema, mut admin, ..
            } => {
                if let Err(error) = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")) {
                    log::warn!("dropping schema {schema} failed: {error}");
                }
            }
            #[cfg(feature = "mysql")]
            Self::Mysql {
                database,
                mut admin,
                ..
            } => {
                if let Err(error) = admin.batch_execute(&format!("DROP DATABASE {database}")) {
                    log::warn!("dropping database {database} failed: {error}");
                }
            }
            Self::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm"] {
                    // Missing -wal/-shm files are fine.
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }
}

/// `url` with its database (the path) replaced by `database`, keeping any query string.
#[cfg(feature = "mysql")]
fn with_database(url: &str, database: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mysql", url));
    let (location, query) = rest
        .split_once('?')
        .map_or((rest, None), |(l, q)| (l, Some(q)));
    let server = location
        .split_once('/')
        .map_or(location, |(server, _)| server);
    match query {
        Some(query) => format!("{scheme}://{server}/{database}?{query}"),
        None => format!("{scheme}://{server}/{database}"),
    }
}

/// Runs the audit with worker processes against the broker at `broker_url`.
///
/// # Errors
///
/// The database or broker could not be set up.
pub(crate) fn run(
    database: &Database,
    broker_url: &str,
    security: &BrokerArgs,
    plan: &Plan,
) -> Result<Report, Error> {
    let started = Instant::now();
    let broker = Broker::new(broker_url, &plan.namespace, security)?;
    let mut target = Target::create(database, &plan.namespace)?;
    let result = match database {
        Database::Postgres(_) => run_on::<PgConnection>(&mut target, &broker, plan, started),
        #[cfg(feature = "mysql")]
        Database::Mysql(_) => {
            run_on::<diesel::MysqlConnection>(&mut target, &broker, plan, started)
        }
        Database::Sqlite(_) => run_on::<SqliteConnection>(&mut target, &broker, plan, started),
    };
    if !plan.keep {
        target.remove();
        if let Err(error) = broker.teardown() {
            log::warn!("removing the run's queues or streams failed: {error}");
        }
    }
    result
}

fn run_on<C: AuditConnection>(
    target: &mut Target,
    broker: &Broker,
    plan: &Plan,
    started: Instant,
) -> Result<Report, Error> {
    let pool = C::pool(&target.pool_url(), 2)?;
    db::prepare(&mut *pool.get()?)?;
    let (proxy, proxied, _private_kafka) = if broker.kind() == Kind::Kafka {
        let listen = kafka_broker::free_port()?;
        let proxy = Proxy::start(&listen.to_string())?;
        let private = PrivateKafka::start(listen, proxy.addr())?;
        let proxied = format!("kafka://{}", proxy.addr());
        (proxy, proxied, Some(private))
    } else {
        let (_, upstream) = proxy::through(broker.url(), ([127, 0, 0, 1], 0).into())?;
        let proxy = Proxy::start(&upstream)?;
        let (proxied, _) = proxy::through(broker.url(), proxy.addr())?;
        (proxy, proxied, None)
    };
    let broker = &broker.at(proxied.clone());
    broker.setup()?;
    let events = std::env::temp_dir().join(format!("{}-events", plan.namespace));
    let spawner = Spawner {
        exe: std::env::current_exe()?,
        broker_url: proxied,
        security: broker.security_args(),
        events: events.clone(),
        plan: plan.clone(),
    };
    let mut run = Run {
        slots: [
            (Role::Writer, 0),
            (Role::Relay, 0),
            (Role::Relay, 1),
            (Role::Consumer, 0),
        ]
        .map(|(role, index)| Slot::new(role, index))
        .into(),
        rng: StdRng::seed_from_u64(plan.seed),
        timeline: Vec::new(),
        faults: Faults::default(),
        proxy,
        down_until: None,
        operator: Operator::new(),
    };
    let outcome = run.drive(target, &spawner, &pool, plan);
    run.stop_all();
    let counts = counter::totals(&events)?;
    if !plan.keep {
        // Only our own files are in there.
        let _ = std::fs::remove_dir_all(&events);
    }
    outcome?;
    let report = Report::new(
        format!("{} + {}", target_name(target), broker_name(broker.url())),
        db::outcome(&mut *pool.get()?)?,
        &counts,
        plan.seed,
        run.faults,
        &run.operator,
        started.elapsed(),
    )
    .sequenced(plan.sequenced);
    Ok(report)
}

fn target_name(target: &Target) -> &'static str {
    match target {
        Target::Postgres { .. } => "PostgreSQL",
        #[cfg(feature = "mysql")]
        Target::Mysql { .. } => "MySQL / MariaDB",
        Target::Sqlite { .. } => "SQLite",
    }
}

fn broker_name(url: &str) -> &'static str {
    if url.starts_with("nats") {
        "NATS JetStream (worker processes)"
    } else if url.starts_with("kafka") {
        "Kafka (tansu, worker processes)"
    } else {
        "RabbitMQ (worker processes)"
    }
}

/// Waits, after the faults stopped, until every committed message took effect and the outbox
/// is empty, then one more second without a new effect for late duplicates; or until the
/// deadline, after which the report shows what is missing.
pub(crate) struct Drain {
    deadline: Instant,
    next_check: Instant,
    settled: Option<(u64, Instant)>,
}

impl Drain {
    /// A drain that gives up after `timeout`.
    pub(crate) fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            deadline: now + timeout,
            next_check: now,
            settled: None,
        }
    }

    /// Whether the run is over: drained and settled, or past the deadline.
    ///
    /// # Errors
    ///
    /// Database failures.
    pub(crate) fn over<C: AuditConnection>(&mut self, pool: &DbPool<C>) -> Result<bool, Error> {
        let now = Instant::now();
        if now >= self.deadline {
            log::warn!("the drain did not finish in time");
            return Ok(true);
        }
        if now < self.next_check {
            return Ok(false);
        }
        self.next_check = now + Duration::from_millis(500);
        let mut conn = pool.get()?;
        let drained = db::count_lost(&mut *conn)? == 0 && db::outbox_backlog(&mut *conn)? == 0;
        let effects = db::count_effects(&mut *conn)?;
        match self.settled {
            Some((seen, since)) if drained && seen == effects => {
                Ok(since.elapsed() >= Duration::from_secs(1))
            }
            _ => {
                self.settled = drained.then_some((effects, now));
                Ok(false)
            }
        }
    }
}

/// Starts worker processes.
struct Spawner {
    exe: PathBuf,
    broker_url: String,
    /// The broker's TLS and credential flags.
    security: Vec<std::ffi::OsString>,
    events: PathBuf,
    plan: Plan,
}

impl Spawner {
    fn spawn(&self, target: &Target, slot: &Slot) -> std::io::Result<Child> {
        let plan = &self.plan;
        // Crash points fire per relay batch and per handled message.
        let crash_probability = match slot.role {
            Role::Writer => 0.0,
            Role::Relay => 0.02,
            Role::Consumer => 0.003,
        };
        let seed = plan
            .seed
            .wrapping_mul(31)
            .wrapping_add(slot.index * 1000 + slot.incarnation);
        let mut command = Command::new(&self.exe);
        command
            .arg("worker")
            .arg(slot.role.name())
            .env(DATABASE_URL_ENV, target.url(Some(slot.role)))
            .env(BROKER_URL_ENV, &self.broker_url)
            .args(["--namespace", &plan.namespace])
            .arg("--events-dir")
            .arg(&self.events)
            .args(["--seed", &seed.to_string()])
            .args(["--crash-probability", &crash_probability.to_string()])
            .args(["--messages", &plan.messages.to_string()])
            .args(["--keys", &plan.keys.to_string()])
            .args(["--rate", &plan.rate.to_string()])
            .args(&self.security)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(broken) = plan.broken {
            command.args(["--break", broken.name()]);
        }
        if plan.sequenced {
            command.arg("--sequenced");
        }
        command.spawn()
    }
}

/// One worker and its restarts.
#[derive(Debug)]
struct Slot {
    role: Role,
    index: u64,
    incarnation: u64,
    child: Option<Child>,
    restart_at: Option<Instant>,
    paused: bool,
    done: bool,
}

impl Slot {
    fn new(role: Role, index: u64) -> Self {
        Self {
            role,
            index,
            incarnation: 0,
            child: None,
            restart_at: Some(Instant::now()),
            paused: false,
            done: false,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, restart after `down`.
    fn kill(&mut self, down: Duration) {
        if let Some(mut child) = self.child.take() {
            // It may have exited by itself a moment ago; either way it is gone now.
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
        self.restart_at = Some(Instant::now() + down);
    }

    fn signal(&mut self, signal: &str) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .is_ok_and(|status| status.success());
        if !sent {
            log::warn!("kill -{signal} {pid} failed");
        }
        sent
    }
}

/// A scheduled action.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// SIGCONT to the slot.
    Resume(usize),
    /// The broker is reachable again.
    BrokerBack,
}

/// A run in progress.
struct Run {
    slots: Vec<Slot>,
    rng: StdRng,
    timeline: Vec<(Instant, Action)>,
    faults: Faults,
    proxy: Proxy,
    /// While the broker is down: until when (outages may overlap).
    down_until: Option<Instant>,
    operator: Operator,
}

impl Run {
    /// Runs the workers through the fault phase and the drain; returns once everything
    /// drained or the drain deadline passed.
    fn drive<C: AuditConnection>(
        &mut self,
        target: &mut Target,
        spawner: &Spawner,
        pool: &DbPool<C>,
        plan: &Plan,
    ) -> Result<(), Error> {
        let mut next_fault = Instant::now() + Duration::from_secs(1);
        let mut next_long_outage = Instant::now() + Duration::from_secs(2);
        let mut drain: Option<Drain> = None;
        loop {
            self.supervise(target, spawner)?;
            if let Err(error) = self.operator.tend(pool, self.down_until.is_none()) {
                log::warn!("the operator's check failed: {error}");
            }
            let now = Instant::now();
            let due: Vec<Action> = self
                .timeline
                .iter()
                .filter(|(at, _)| *at <= now)
                .map(|(_, action)| *action)
                .collect();
            self.timeline.retain(|(at, _)| *at > now);
            for action in due {
                self.apply(action);
            }
            let writing = self.slots.iter().any(|s| s.role == Role::Writer && !s.done);
            if writing && now >= next_fault {
                self.inject(target);
                next_fault = now + Duration::from_millis(self.rng.random_range(300..1200));
            }
            if writing && now >= next_long_outage {
                let down = Plan::long_outage(&mut self.rng, PUBLISH_TIMEOUT);
                self.broker_down(down);
                self.faults.outages_beyond_budget += 1;
                next_long_outage = now + down + Plan::long_outage_gap(&mut self.rng);
            }
            if !writing && self.timeline.is_empty() && drain.is_none() {
                log::info!("faults stopped; draining");
                drain = Some(Drain::new(plan.drain_timeout()));
            }
            if let Some(drain) = drain.as_mut() {
                if drain.over(pool)? {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Notices exits and restarts workers whose time has come.
    fn supervise(&mut self, target: &Target, spawner: &Spawner) -> Result<(), Error> {
        for slot in &mut self.slots {
            if let Some(child) = slot.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    slot.child = None;
                    slot.paused = false;
                    if slot.role == Role::Writer && status.success() {
                        slot.done = true;
                        continue;
                    }
                    log::info!("{} {} exited: {status}", slot.role.name(), slot.index);
                    if status.signal() == Some(SIGABRT) {
                        self.faults.worker_crashes += 1;
                    } else {
                        self.faults.worker_errors += 1;
                    }
                    slot.restart_at = Some(Instant::now() + Duration::from_millis(300));
                }
            }
            if slot.child.is_none()
                && !slot.done
                && slot.restart_at.is_some_and(|at| at <= Instant::now())
            {
                slot.incarnation += 1;
                slot.child = Some(spawner.spawn(target, slot)?);
                slot.restart_at = None;
            }
        }
        Ok(())
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Resume(index) => {
                if let Some(slot) = self.slots.get_mut(index).filter(|slot| slot.paused) {
                    slot.signal("CONT");
                    slot.paused = false;
                }
            }
            Action::BrokerBack => {
                if self.down_until.is_some_and(|until| until <= Instant::now()) {
                    self.proxy.refuse(false);
                    self.down_until = None;
                }
            }
        }
    }

    /// Makes the broker unreachable for `down` (or longer, when already down for longer).
    fn broker_down(&mut self, down: Duration) {
        self.proxy.refuse(true);
        self.proxy.cut();
        let until = Instant::now() + down;
        self.down_until = Some(self.down_until.map_or(until, |current| current.max(until)));
        self.timeline.push((until, Action::BrokerBack));
    }

    /// Injects one fault drawn from the schedule.
    fn inject(&mut self, target: &mut Target) {
        let relay = self.rng.random_range(1..=2);
        match self.rng.random_range(0..6) {
            0 => {
                let down = Duration::from_millis(self.rng.random_range(100..1000));
                self.slots[relay].kill(down);
                self.faults.relay_kills += 1;
            }
            1 => {
                let down = Duration::from_millis(self.rng.random_range(300..1000));
                self.slots[3].kill(down);
                self.faults.consumer_kills += 1;
            }
            2 => {
                let slot = &mut self.slots[relay];
                if !slot.paused && slot.signal("STOP") {
                    slot.paused = true;
                    self.faults.relay_pauses += 1;
                    let resume = Instant::now() + LEASE + Duration::from_secs(1);
                    self.timeline.push((resume, Action::Resume(relay)));
                }
            }
            3 => {
                self.proxy.cut();
                self.faults.broker_cuts += 1;
            }
            4 => {
                let down = Duration::from_millis(self.rng.random_range(1000..3000));
                self.broker_down(down);
                self.faults.broker_outages += 1;
            }
            _ => {
                let role = [Role::Writer, Role::Relay, Role::Consumer][self.rng.random_range(0..3)];
                match target.terminate(role) {
                    Some(Ok(n)) => {
                        log::info!("terminated {n} backends of the {}", role.name());
                        self.faults.backend_terminations += 1;
                    }
                    Some(Err(error)) => log::warn!("pg_terminate_backend failed: {error}"),
                    None => {
                        // SQLite has no server: cut the broker instead.
                        self.proxy.cut();
                        self.faults.broker_cuts += 1;
                    }
                }
            }
        }
    }

    /// Ends every worker.
    fn stop_all(&mut self) {
        for slot in &mut self.slots {
            slot.kill(Duration::ZERO);
            slot.done = true;
        }
        self.proxy.refuse(false);
        self.down_until = None;
    }
}

#[cfg(all(test, feature = "mysql"))]
mod tests {
    use super::with_database;

    #[test]
    fn the_run_database_replaces_the_one_in_the_url() {
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306/test", "audit_1"),
            "mysql://root@127.0.0.1:3306/audit_1"
        );
        assert_eq!(
            with_database("mysql://u:p@db:3306?ssl_mode=disabled", "audit_1"),
            "mysql://u:p@db:3306/audit_1?ssl_mode=disabled"
        );
    }
}

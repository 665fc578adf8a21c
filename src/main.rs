//! The `relay` binary: parse the command line, load settings, dispatch.

use std::io::{BufRead as _, Write};
use std::process::ExitCode;

use clap::Parser as _;
use relay::app::{App, raise_file_limit, shutdown_signal};
use relay::auth::Passwords;
use relay::auth::users::{AdminViewUser, Registration, check_token_limit, create_user};
use relay::cli::{
    Cli, Command, HealthArgs, MockArgs, ServeArgs, UserCommand, UserCreateArgs, UserListArgs,
    UserRevokeArgs, UserSetArgs,
};
use relay::config::{Config, Mode};
use relay::store::{AdminChange, Store, UserPatch, UserRecord};

// A faster allocator than glibc's for many small, short-lived allocations across threads,
// which is what a proxy does all day.
#[global_allocator]
static GLOBAL: Mimalloc = Mimalloc;

/// mimalloc, asked as `malloc` is whenever that gives the alignment wanted. The `mimalloc`
/// crate calls `mi_malloc_aligned` for every allocation, whose fast path serves only blocks
/// under 1 KiB that happen to be aligned: every larger one (a connection's 4-8 KiB read
/// buffer, an answer's body) went through the over-allocating path (issue 14).
struct Mimalloc;

/// What `mi_malloc` guarantees: every block of more than 8 bytes is aligned to 16 (mimalloc
/// rounds block sizes to two words), one of 8 bytes or less to 8 — `malloc`'s own contract,
/// the one `std::alloc::System` relies on with glibc.
const MALLOC_ALIGN: usize = 16;

fn malloc_aligns(layout: std::alloc::Layout) -> bool {
    layout.align() <= MALLOC_ALIGN && layout.align() <= layout.size()
}

// SAFETY: every pointer comes from mimalloc and goes back to it; `mi_malloc` and friends are
// used only for layouts whose alignment they guarantee (`malloc_aligns`), the aligned calls
// for all others, as the `mimalloc` crate does.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if malloc_aligns(layout) {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if malloc_aligns(layout) {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: see the impl.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN && layout.align() <= new_size {
            // SAFETY: see the impl.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe {
                libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

/// mimalloc's `mi_option_arena_eager_commit`, `_purge_delay`, `_arena_purge_mult` and
/// `_allow_thp`: their positions in `mi_option_e` (mimalloc v3, the version `libmimalloc-sys`
/// builds); the Rust bindings do not name them.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
const MI_OPTION_ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Transparent huge pages make the kernel back a touched 4 KiB page of the allocator's arenas
/// with 2 MiB: relay's memory is many small connection buffers, and with THP its resident size
/// during 1,000 streams was 24 MiB larger for nothing. mimalloc asks for huge pages on its
/// arenas (before `main` runs, so its own option comes too late for the first one); this
/// turns them off for the whole process.
fn disable_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
        // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Give freed memory back to the system soon (50 ms), and commit arena memory only when used:
    // password hashing allocates 19 MiB a time, which would otherwise stay in the process.
    // SAFETY: setting an option stores an integer; no thread but this one runs yet.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 50);
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_PURGE_MULT, 1);
        libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
    }
    let thp = disable_transparent_huge_pages();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs::default()));
    if let Command::MockUpstream(args) = command {
        return run_mock(args);
    }
    if let Command::Health(args) = command {
        return run_health(args);
    }
    let mode = match &command {
        Command::Serve(args) if args.dev => Mode::Dev,
        Command::Serve(_) => Mode::Serve,
        Command::Migrate | Command::User(_) | Command::MockUpstream(_) | Command::Health(_) => {
            Mode::Admin
        }
    };
    let config = match Config::load(mode) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::from(2);
        }
    };
    let _log_guard = relay::telemetry::init(&config.log.level, config.log.format);
    if let Err(err) = thp {
        tracing::warn!(error = %err, "cannot turn off transparent huge pages");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("relay: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match command {
            Command::Serve(_) => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::User(UserCommand::Create(args)) => user_create(config, args).await,
            Command::User(UserCommand::Set(args)) => user_set(config, args).await,
            Command::User(UserCommand::List(args)) => user_list(config, args).await,
            Command::User(UserCommand::Revoke(args)) => user_revoke(config, args).await,
            Command::MockUpstream(_) | Command::Health(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %format!("{err:#}"), "relay failed");
            eprintln!("relay: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    if config.dev {
        tracing::warn!(
            "DEV MODE: ephemeral secret key, SQLite, in-memory rate limits. NOT FOR PRODUCTION."
        );
    }
    if config.auth.secret_key_ephemeral && !config.dev {
        tracing::warn!("DEBUG without SECRET_KEY: tokens are signed with an ephemeral key");
    }
    // Every client connection is a file descriptor: take all the process may have.
    match raise_file_limit() {
        Ok((before, after)) if after > before => {
            tracing::info!(before, after, "file limit raised to the hard limit");
        }
        Ok((_, limit)) => tracing::info!(limit, "file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the file limit"),
    }
    let playground = config.playground_enabled();
    let app = App::build(config).await?;
    let addr = app.local_addr()?;
    tracing::info!(address = %addr, "relay listening on http://{addr}");
    if playground {
        tracing::info!("playground page: http://{addr}/");
    }
    app.run_until_stopped(shutdown_signal()).await
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    store.close().await;
    tracing::info!(engine = store.engine(), "migrations applied");
    Ok(())
}

async fn user_create(config: Config, args: UserCreateArgs) -> anyhow::Result<()> {
    let mut password = String::new();
    std::io::stdin().lock().read_line(&mut password)?;
    let password = password.trim_end_matches(['\r', '\n']).to_owned();
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let passwords = Passwords::new(1).await?;
    let user = create_user(
        &store,
        &passwords,
        Registration {
            email: args.email,
            password,
            full_name: args.full_name,
            is_admin: args.admin,
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    store.close().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&user)?)?;
    Ok(())
}

/// A user as the CLI prints it: one JSON object, with the user's own token limit.
fn print_user(out: &mut impl Write, user: UserRecord) -> anyhow::Result<()> {
    writeln!(
        out,
        "{}",
        serde_json::to_string(&AdminViewUser::from(user))?
    )?;
    Ok(())
}

/// The user with `email`, or an error naming it.
async fn user_by_email(store: &Store, email: &str) -> anyhow::Result<UserRecord> {
    let email = email.trim().to_lowercase();
    store
        .user_by_email(&email)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no user with email {email}"))
}

/// `relay user set`: changes what the flags name, then prints the user (with its own token
/// limit). Running relays see the change within seconds (their user-state cache). Like the
/// admin API, it will not leave the database without an active admin.
async fn user_set(config: Config, args: UserSetArgs) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let user = user_by_email(&store, &args.email).await?;
    // 0 returns to the default.
    let positive = |n: Option<u64>| -> anyhow::Result<Option<Option<i64>>> {
        Ok(match n {
            None => None,
            Some(0) => Some(None),
            Some(n) => Some(Some(i64::try_from(n)?)),
        })
    };
    let patch = UserPatch {
        is_active: args.active,
        is_admin: args.admin,
        full_name: None,
        token_limit: positive(args.token_limit)?,
        token_limit_window: positive(args.token_limit_window)?,
    };
    if patch.token_limit.is_some() || patch.token_limit_window.is_some() {
        let default_window = config
            .rate_limits
            .tokens
            .map_or(86_400, |limit| limit.window.as_secs());
        check_token_limit(
            patch.token_limit.unwrap_or(user.token_limit),
            patch.token_limit_window.unwrap_or(user.token_limit_window),
            default_window,
        )
        .map_err(|(_, why)| anyhow::anyhow!(why))?;
    }
    let user = match store.update_user(user.id, &patch).await? {
        AdminChange::Done(user) => user,
        AdminChange::NotFound => anyhow::bail!("the user was deleted meanwhile"),
        AdminChange::LastAdmin => {
            anyhow::bail!("this would leave no active admin: make another user an admin first")
        }
    };
    store.close().await;
    print_user(&mut std::io::stdout().lock(), user)
}

/// `relay user list`: every user (or those matching `--query`), one JSON object a line, in id
/// order, read a page at a time.
async fn user_list(config: Config, args: UserListArgs) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let query = args
        .query
        .as_deref()
        .map(str::trim)
        .filter(|q| !q.is_empty());
    let mut out = std::io::stdout().lock();
    let mut after = None;
    loop {
        let page = store.list_users(query, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        let full = page.len() == 500;
        for user in page {
            print_user(&mut out, user)?;
        }
        if !full {
            break;
        }
    }
    store.close().await;
    Ok(())
}

/// `relay user revoke`: ends every session and API key of the user; running relays refuse
/// them within seconds.
async fn user_revoke(config: Config, args: UserRevokeArgs) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    store.migrate().await?;
    let user = user_by_email(&store, &args.email).await?;
    if !store.revoke_user(user.id).await? {
        anyhow::bail!("the user was deleted meanwhile");
    }
    store.close().await;
    tracing::info!(user_id = %user.id, "every session and API key of the user revoked");
    Ok(())
}

fn run_mock(args: MockArgs) -> ExitCode {
    let _log_guard = relay::telemetry::init("info", relay::config::LogFormat::Pretty);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
                tracing::info!(address = %listener.local_addr()?, "mock upstream listening");
                let options = relay::mock::MockOptions {
                    latency: std::time::Duration::from_millis(args.latency_ms),
                    chunks: args.chunks,
                    chunk_delay: std::time::Duration::from_millis(args.chunk_delay_ms),
                };
                relay::mock::serve(listener, options, shutdown_signal()).await?;
                Ok(())
            })
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("relay mock-upstream: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `relay health`: one `GET` of the health endpoint, bounded by `--timeout`. Exit codes are
/// what Docker's `HEALTHCHECK` expects: 0 healthy, 1 not (a settings problem included; 2 is
/// reserved there). Settings are read as `relay serve` reads them, in admin mode, so that the
/// check needs no secret.
fn run_health(args: HealthArgs) -> ExitCode {
    let url = match args.url {
        Some(url) => url,
        None => match Config::load(Mode::Admin) {
            Ok(config) => config.server.health_url(),
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::FAILURE;
            }
        },
    };
    match relay::probe::http_get(&url, std::time::Duration::from_secs(args.timeout)) {
        Ok(answer) if answer.status == 200 => {
            let _ = writeln!(std::io::stdout().lock(), "{url}: 200 {}", answer.body);
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("relay health: {url}: {}", answer.status);
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("relay health: {url}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::Mimalloc;

    /// A block of `layout` from `Mimalloc`, checked for its alignment (and zeroes), filled
    /// with a pattern.
    ///
    /// # Safety
    /// `layout` has a non-zero size; the block is to be freed with it.
    unsafe fn filled(layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: the caller's.
        unsafe {
            let ptr = if zeroed {
                Mimalloc.alloc_zeroed(layout)
            } else {
                Mimalloc.alloc(layout)
            };
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % layout.align(), 0, "{layout:?}");
            if zeroed {
                assert!((0..layout.size()).all(|i| *ptr.add(i) == 0), "{layout:?}");
            }
            for i in 0..layout.size() {
                *ptr.add(i) = i as u8;
            }
            ptr
        }
    }

    /// Every layout gets a pointer with its alignment, whichever of mimalloc's calls serves
    /// it, and keeps its bytes through a `realloc` that grows or shrinks it.
    #[test]
    fn every_layout_gets_its_alignment_and_keeps_its_bytes() {
        let sizes = [
            1, 3, 7, 8, 9, 15, 16, 17, 24, 40, 100, 1000, 1025, 4096, 8000, 70_000,
        ];
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in sizes {
                let layout = Layout::from_size_align(size, align).unwrap();
                for zeroed in [false, true] {
                    // SAFETY: non-zero sizes; each block is used within its size and freed
                    // with the layout it has then.
                    unsafe {
                        Mimalloc.dealloc(filled(layout, zeroed), layout);
                        for new_size in [size / 2 + 1, size * 3] {
                            let ptr = filled(layout, zeroed);
                            let moved = Mimalloc.realloc(ptr, layout, new_size);
                            assert_eq!(
                                moved as usize % align,
                                0,
                                "{size} -> {new_size} at {align}"
                            );
                            let kept = size.min(new_size);
                            assert!((0..kept).all(|i| *moved.add(i) == i as u8));
                            let new = Layout::from_size_align(new_size, align).unwrap();
                            let back = Mimalloc.realloc(moved, new, size);
                            assert_eq!(back as usize % align, 0, "{new_size} -> {size} at {align}");
                            assert!((0..kept).all(|i| *back.add(i) == i as u8));
                            Mimalloc.dealloc(back, layout);
                        }
                    }
                }
            }
        }
    }
}
